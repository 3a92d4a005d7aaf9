"""Prompt text -> the UNet's context: chunks through the text encoder, A1111's emphasis, clip skip.

Every chunk of every prompt (and negative prompt) goes through one `backend.encode_text` call as a
batch of 77-id rows; each prompt's chunks are then laid side by side, so a prompt of k chunks gives a
context of (77·k, C). Prompts of a call are padded with empty-prompt chunks to the longest one (the
negatives too: classifier-free guidance batches them with the prompts).

clip skip (A1111's setting): 1 is the text encoder's own output layer, N the layer N−1 before it, always
followed by the final LayerNorm. For SD1 that is A1111's meaning exactly (N: hidden_states[−N]). SD2's own
output layer is already OpenCLIP's penultimate one (A1111 always uses it there and ignores the
setting); here clip skip counts back from it, the same for an SD2 checkpoint (24 layers, output −2) and
a diffusers SD2 folder (23 layers, output −1). diffusers' `clip_skip=k` is this clip skip k+1.
"""
from __future__ import annotations

import torch

from .chunks import Chunk, ChunkLayout, prompt_chunks
from .textual_inversion import TextualInversions

SYNTAXES = ("a1111", "plain")


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's default emphasis ("Original") on a batch of chunks: z (N, L, C), weights (N, L).

        z_w  = z · w[..., None]                         every token's hidden state times its weight
        out  = z_w · (mean(z) / mean(z_w))               mean over one chunk's (L, C) values

    One scalar mean per row, i.e. per prompt and chunk, so the result does not depend on what else is
    in the batch; A1111's own mean spans its batch, which is one prompt in the usual case. Where the
    weighted mean is exactly 0 the rescale is left out (A1111 would divide by zero).
    """
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None].to(z.dtype)
    new_mean = z.mean(dim=(1, 2), keepdim=True)
    ratio = torch.where(new_mean != 0, original_mean / torch.where(new_mean != 0, new_mean, 1), 1)
    return z * ratio


def output_layer_for(config, clip_skip: int | None) -> int | None:
    """The text encoder layer for `clip_skip` (None: the model's own, returned as None)."""
    if clip_skip is None:
        return None
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an integer >= 1 (1 = the model's own output layer), got {clip_skip!r}")
    most = config.layers + config.output_layer + 1  # layers up to and including the model's output layer
    if clip_skip > most:
        raise ValueError(f"clip_skip={clip_skip} is too large: this text encoder has {most} layers up to its "
                         f"output layer; use 1..{most}")
    layer = config.output_layer - (clip_skip - 1)
    return None if layer == config.output_layer else layer


class PromptEncoder:
    """Prompts -> context (B, 77·k, C) through `backend.encode_text`, with the A1111 syntax (or plain
    text), long prompts, clip skip and textual-inversion embeddings."""

    def __init__(self, model, backend, syntax: str = "a1111", clip_skip: int | None = None, embedding_dirs=None,
                 on_change=None):
        if syntax not in SYNTAXES:
            raise ValueError(f"prompt_syntax must be 'a1111' or 'plain', got {syntax!r}")
        if model.text_encoder is None or model.tokenizer is None:
            raise ValueError(f"{model.config.name} has no text encoder: it takes no prompts")
        self.model = model
        self.backend = backend
        self.syntax = syntax
        self.config = model.text_encoder.config
        output_layer_for(self.config, clip_skip)  # refuse a bad default now, not at the first call
        self.clip_skip = clip_skip
        self.tokenizer = model.tokenizer
        self.layout = ChunkLayout.of(model.tokenizer)
        self.embeddings = TextualInversions(model.text_encoder, model.tokenizer.tokenize, embedding_dirs, on_change)

    @property
    def tokens_per_chunk(self) -> int:
        return self.layout.length + 2

    def chunks(self, prompt: str) -> list[Chunk]:
        return prompt_chunks(prompt, self.tokenizer, self.syntax, self.embeddings.split, self.layout)

    def _encode_rows(self, chunks: list[Chunk], clip_skip: int | None) -> torch.Tensor:
        """Chunks -> (N, 77, C), emphasis applied to the weighted ones."""
        layer = output_layer_for(self.config, self.clip_skip if clip_skip is None else clip_skip)
        ids = torch.tensor([c.ids for c in chunks], dtype=torch.long)
        z = self.backend.encode_text(ids) if layer is None else self.backend.encode_text(ids, output_layer=layer)
        weighted = [i for i, c in enumerate(chunks) if c.weighted]
        if weighted:  # rows of weight 1.0 stay bit-exact: the rescale would only round them
            rows = torch.tensor(weighted)
            w = torch.tensor([chunks[i].weights for i in weighted], dtype=torch.float32)
            z = z.clone()
            z[rows] = emphasize(z[rows], w.to(z.device))
        return z

    def encode_texts(self, texts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """Each text -> (77·k, C), all padded with empty-prompt chunks to the longest: (len(texts), 77·k, C)."""
        self.embeddings.load_mentioned(texts)
        per_text = [self.chunks(t) for t in texts]
        k = max(len(c) for c in per_text)
        empty = self.layout.empty()
        rows = [c[i] if i < len(c) else empty for c in per_text for i in range(k)]
        z = self._encode_rows(rows, clip_skip)
        return z.reshape(len(texts), k * z.shape[1], z.shape[2])

    def empty_context(self, clip_skip: int | None = None) -> torch.Tensor:
        """The empty prompt's one chunk, (1, 77, C)."""
        return self._encode_rows([self.layout.empty()], clip_skip)

    def pad_to(self, context: torch.Tensor, tokens: int, clip_skip: int | None = None) -> torch.Tensor:
        """Append empty-prompt chunks to (B, L, C) up to (B, tokens, C)."""
        missing = (tokens - context.shape[1]) // self.tokens_per_chunk
        if missing <= 0:
            return context
        empty = self.empty_context(clip_skip).to(context.device, context.dtype)
        return torch.cat([context, empty.expand(context.shape[0], -1, -1).repeat(1, missing, 1)], dim=1)

    def check_embeds(self, embeds, name: str, context_dim: int, batch: int | None = None) -> torch.Tensor:
        """A user's (B, L, C) context: C the UNet's context width, L a multiple of 77."""
        n = self.tokens_per_chunk
        if not isinstance(embeds, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (batch, {n}·k, {context_dim}), got "
                             f"{type(embeds).__name__}")
        shape = tuple(embeds.shape)
        if len(shape) != 3 or shape[2] != context_dim or shape[1] == 0 or shape[1] % n:
            raise ValueError(f"{name} must have shape (batch, {n}·k, {context_dim}) for this model (k chunks of "
                             f"{n} tokens), got {shape}")
        if batch is not None and shape[0] != batch:
            raise ValueError(f"{name} has batch {shape[0]}, the prompts {batch}; give one per prompt")
        if not torch.isfinite(embeds).all():
            raise ValueError(f"{name} holds NaN or inf values")
        return embeds.detach().float()

    def conditioning(self, prompts: list[str] | None, negatives: str | list[str] | None, guided: bool,
                     clip_skip: int | None = None, prompt_embeds=None, negative_prompt_embeds=None,
                     context_dim: int | None = None):
        """(context, uncond or None) from texts and/or ready-made embeddings (diffusers' prompt_embeds /
        negative_prompt_embeds). `negatives` None: the empty prompt; a string: the same for every prompt.
        Texts are encoded in one call, and context and uncond padded with empty-prompt chunks to one length."""
        context_dim = context_dim or self.config.width
        if prompt_embeds is not None and prompts is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if negative_prompt_embeds is not None and negatives is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        context = uncond = None
        if prompt_embeds is not None:
            context = self.check_embeds(prompt_embeds, "prompt_embeds", context_dim)
        batch = context.shape[0] if context is not None else len(prompts)
        if batch == 0:
            raise ValueError("no prompts given: pass a prompt (the empty string for none) or prompt_embeds")
        if negative_prompt_embeds is not None and guided:
            uncond = self.check_embeds(negative_prompt_embeds, "negative_prompt_embeds", context_dim, batch)
        negatives = [negatives or ""] * batch if negatives is None or isinstance(negatives, str) else list(negatives)
        if len(negatives) != batch:
            raise ValueError(f"got {len(negatives)} negative prompts for {batch} prompts")
        texts = [] if context is not None else list(prompts)
        if guided and uncond is None:
            texts += negatives
        if texts:  # one text-encoder call for every text of the call
            z = self.encode_texts(texts, clip_skip)
            if context is None:
                context, z = z[:batch], z[batch:]
            if len(z):
                uncond = z
        if not guided:
            return context, None
        length = max(context.shape[1], uncond.shape[1])
        return self.pad_to(context, length, clip_skip), self.pad_to(uncond, length, clip_skip)

    def used_embeddings(self, texts: list[str]):
        """The loaded embeddings these texts call up (for the image's parameters)."""
        self.embeddings.load_mentioned([t for t in texts if t])
        return self.embeddings.used_in([t for t in texts if t])


__all__ = ["PromptEncoder", "SYNTAXES", "emphasize", "output_layer_for"]
