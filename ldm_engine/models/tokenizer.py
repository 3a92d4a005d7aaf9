"""CLIP byte-level BPE tokenizer (Radford et al. 2021), offline.

Vocabulary sources, in order: a `vocab.json` + `merges.txt` pair (a diffusers folder's `tokenizer/`),
else the CLIP vocabulary embedded in the `instant-clip-tokenizer` package. Both give the ids of the
original CLIP tokenizer. Sequences are `[start] tokens [end] pad...`, 77 long; SD1 pads with the end
token, SD2 (OpenCLIP) with 0.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The pre-tokenization split of CLIP: contractions, letter runs, single digits, punctuation runs.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def read_bpe_files(folder: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a tokenizer folder: `vocab.json` + `merges.txt` (what transformers 4 writes), else
    the BPE model inside `tokenizer.json` (transformers 5 writes only that file)."""
    folder = Path(folder)
    vocab_file, merges_file, fast_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    if vocab_file.is_file() and merges_file.is_file():
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        return vocab, [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    if fast_file.is_file():
        model = json.loads(fast_file.read_text(encoding="utf-8")).get("model", {})
        if model.get("type") == "BPE" and "vocab" in model and "merges" in model:
            # merges are "a b" strings in older files, [a, b] pairs in newer ones
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return model["vocab"], merges
        raise FileNotFoundError(f"{fast_file} holds no BPE vocabulary (model type {model.get('type')!r}); "
                                f"a CLIP tokenizer folder needs vocab.json + merges.txt or a BPE tokenizer.json")
    raise FileNotFoundError(f"tokenizer folder {folder} needs vocab.json and merges.txt, or tokenizer.json")


class _FileBPE:
    """BPE from vocab.json/merges.txt, run by the `tokenizers` library with CLIP's normalization."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token="<|endoftext|>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.bos_id = vocab["<|startoftext|>"]
        self.eos_id = vocab["<|endoftext|>"]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids).replace("</w>", " ").strip()


class _EmbeddedBPE:
    """The CLIP vocabulary that `instant-clip-tokenizer` carries inside its wheel."""

    def __init__(self):
        try:
            import instant_clip_tokenizer
        except ImportError as e:  # pragma: no cover - it is a declared dependency
            raise RuntimeError("no tokenizer files given and instant-clip-tokenizer is not installed; "
                               "pip install instant-clip-tokenizer, or point to a folder with vocab.json "
                               "and merges.txt") from e
        self._tok = instant_clip_tokenizer.Tokenizer()
        self.bos_id, self.eos_id = 49406, 49407

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids)).strip()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (the byte-level BPE alphabet, 256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes map to code points from 256 on
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_vocab(folder: str | Path) -> Path:
    """Write the embedded CLIP vocabulary as `vocab.json` + `merges.txt` in `folder` (the files a diffusers
    folder's `tokenizer/` holds), so tools that read tokenizer files (transformers, optimum-intel) get the
    ids this package's CLIPTokenizer gives. The merges are the text instant-clip-tokenizer's library embeds;
    ids follow CLIP's order: 256 byte symbols, the same with `</w>`, one per merge, then start and end."""
    import instant_clip_tokenizer

    lib = next(Path(instant_clip_tokenizer.__file__).parent.glob("instant_clip_tokenizer*.so"))
    data = lib.read_bytes()
    start = data.find(b"#version: 0.2\n")
    if start < 0:
        raise RuntimeError(f"{lib.name} does not carry CLIP's merges as text; give a tokenizer folder instead")
    n_merges = 49152 - 256 - 2  # CLIP's vocabulary is 49408 = 2 * 256 symbols + merges + 2 specials
    merges = [tuple(line.decode("utf-8").split()) for line in data[start:].split(b"\n")[1:1 + n_merges]]
    if not all(len(m) == 2 for m in merges):
        raise RuntimeError(f"the merges embedded in {lib.name} are not in the expected format")
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


class PaddedRows:
    """Rows of `max_length` ids, `[start] pieces [end] padding`, over a subword codec (`self._codec`, with
    encode / decode) and the special ids a subclass sets; shared by the CLIP and WordPiece tokenizers."""

    unit = "tokens"  # what the warning about a long prompt calls the codec's pieces

    def tokenize(self, text: str) -> list[int]:
        """Text -> its ids: no start/end tokens, no padding, no length limit."""
        return self._codec.encode(text)

    def encode(self, prompt: str) -> list[int]:
        """One prompt -> [start] + pieces + [end] + padding (max_length ids); long prompts are
        truncated with a warning that names the dropped words."""
        ids = self._codec.encode(prompt)
        room = self.max_length - 2
        if len(ids) > room:
            log.warning("prompt is longer than %d %s; dropped: %r", room, self.unit, self._codec.decode(ids[room:]))
            ids = ids[:room]
        ids = [self.bos_token_id, *ids, self.eos_token_id]
        return ids + [self.pad_token_id] * (self.max_length - len(ids))

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        return torch.tensor([self.encode(p) for p in prompts], dtype=torch.long)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.bos_token_id:
            ids = ids[1:]
        if self.eos_token_id in ids:  # everything after the end token is padding
            ids = ids[: ids.index(self.eos_token_id)]
        return self._codec.decode(ids)


class CLIPTokenizer(PaddedRows):
    """prompts -> LongTensor (B, max_length) of CLIP token ids."""

    def __init__(self, folder: str | Path | None = None, max_length: int = 77, pad_token_id: int | None = None):
        if folder is not None:
            self._codec = _FileBPE(*read_bpe_files(folder))
        else:
            self._codec = _EmbeddedBPE()
        self.max_length = max_length
        self.bos_token_id, self.eos_token_id = self._codec.bos_id, self._codec.eos_id
        self.pad_token_id = self.eos_token_id if pad_token_id is None else pad_token_id
