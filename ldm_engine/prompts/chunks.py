"""Prompts of any length as 75-token chunks, the way A1111 lays them out.

Each chunk is `[start] up to 75 tokens [end] padding`, 77 ids, padded as the model family pads (SD1 with
the end token, SD2 with 0), every token carrying the weight of the run it came from (1.0 for start, end
and padding). Rules:
- a chunk that is full when the next token arrives is closed; if a comma lies within the last
  `backtrack` (20) tokens, the chunk is cut just after that comma and the tokens behind it move on
  to the next chunk (A1111's comma back-off), so phrases stay whole;
- BREAK closes the current chunk (padding it), even a short one;
- a textual-inversion embedding is atomic: when its vectors do not fit in what is left of a chunk,
  the chunk is closed and the embedding starts the next one;
- an empty prompt is one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .parser import BREAK, parse_prompt

CHUNK_TOKENS = 75  # prompt tokens per chunk; with start and end, the text encoder's 77
COMMA_BACKTRACK = 20


@dataclass
class Chunk:
    ids: list[int]  # CHUNK_TOKENS + 2
    weights: list[float]  # same length

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


@dataclass(frozen=True)
class ChunkLayout:
    """The special ids of a tokenizer, and the chunking rules' numbers."""

    bos: int
    eos: int
    pad: int
    comma: int | None  # id of ',' (A1111's ',</w>'); None: no comma back-off
    length: int = CHUNK_TOKENS
    backtrack: int = COMMA_BACKTRACK

    @classmethod
    def of(cls, tokenizer) -> "ChunkLayout":
        comma = tokenizer.tokenize(",")
        return cls(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                   comma[0] if len(comma) == 1 else None, tokenizer.max_length - 2)

    def empty(self) -> Chunk:
        return self.close([], [])

    def close(self, ids: list[int], weights: list[float]) -> Chunk:
        fill = self.length - len(ids)
        return Chunk([self.bos, *ids, self.eos] + [self.pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill)


Item = int | tuple[int, ...]  # a token id, or an embedding's ids (never split)


def layout_chunks(runs: list, layout: ChunkLayout) -> list[Chunk]:
    """`runs`: (items, weight) pairs in prompt order, or BREAK. Returns at least one chunk."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `ids` of the last comma of the open chunk

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(layout.close(ids, weights))
        ids, weights, last_comma = [], [], -1

    n = layout.length
    for run in runs:
        if run is BREAK:
            close()
            continue
        items, weight = run
        for item in items:
            if isinstance(item, int) and item == layout.comma:
                last_comma = len(ids)
            elif len(ids) == n and last_comma != -1 and n - last_comma <= layout.backtrack:
                cut = last_comma + 1  # keep the comma, move what follows it
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == n:
                close()
            if isinstance(item, tuple):
                if len(ids) + len(item) > n:
                    close()
                ids += item
                weights += [weight] * len(item)
            else:
                ids.append(item)
                weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def prompt_runs(text: str, tokenize: Callable[[str], list[int]], syntax: str = "a1111",
                split: Callable[[str], list] | None = None) -> list:
    """Parse `text` and tokenize each weighted run on its own (as A1111 does); `split` cuts a run's
    text around textual-inversion triggers, giving their id groups in place."""
    runs = []
    for run in parse_prompt(text, syntax):
        if run is BREAK:
            runs.append(BREAK)
            continue
        part, weight = run
        items: list[Item] = []
        for piece in (split(part) if split is not None else [part]):
            if isinstance(piece, tuple):
                items.append(piece)
            elif piece:
                items.extend(tokenize(piece))
        runs.append((items, weight))
    return runs


def prompt_chunks(text: str, tokenizer, syntax: str = "a1111", split: Callable[[str], list] | None = None,
                  layout: ChunkLayout | None = None) -> list[Chunk]:
    """One prompt -> its chunks."""
    layout = layout or ChunkLayout.of(tokenizer)
    return layout_chunks(prompt_runs(text, tokenizer.tokenize, syntax, split), layout)
