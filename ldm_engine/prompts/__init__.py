"""Prompt text -> the UNet's context: the A1111 prompt syntax (weights, BREAK), prompts of any length in
75-token chunks, clip skip, and textual-inversion embeddings.

    parser.py             (x) [x] (x:1.5) escapes BREAK -> runs of (text, weight)
    chunks.py             runs -> 77-id chunks (comma back-off, BREAK, atomic embeddings)
    encode.py             chunks -> context through the backend; A1111's emphasis; clip skip
    textual_inversion.py  embedding files, the enlarged token table, trigger matching
"""
from .chunks import Chunk, ChunkLayout, layout_chunks, prompt_chunks
from .encode import PromptEncoder, emphasize, output_layer_for
from .parser import BREAK, parse_prompt, parse_prompt_attention
from .textual_inversion import Embedding, TextualInversions, read_embedding_file

__all__ = ["BREAK", "Chunk", "ChunkLayout", "Embedding", "PromptEncoder", "TextualInversions", "emphasize",
           "layout_chunks", "output_layer_for", "parse_prompt", "parse_prompt_attention", "prompt_chunks",
           "read_embedding_file"]
