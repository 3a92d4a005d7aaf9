"""BERT's uncased WordPiece tokenizer (Devlin et al. 2019; WordPiece: Wu et al. 2016), offline, for the
LDM text-to-image models, whose BERTEmbedder reads `bert-base-uncased` word pieces.

    text ─clean (drop control chars, whitespace → ' ') ─ spaces around CJK ideographs ─ NFC ─ split on
         whitespace ─ lowercase, strip accents (NFD, drop combining marks) ─ split off every punctuation char
         ─ WordPiece: greedy longest match from the left, continuations as `##piece`; a word with an
         unmatched rest (or over 100 characters) becomes [UNK]
    ids  = [CLS] pieces… [SEP] [PAD]…  (max_length, 77), truncated to max_length − 2 pieces

Special-token literals in the text ("[MASK]") stay one token, as transformers' BertTokenizer keeps them.

Vocabulary sources, in order: a file or folder the caller names (`vocab.txt`, one token per line, id = line
number; or a `tokenizer.json` with a WordPiece model, which transformers 5 writes in place of vocab.txt),
else the bert-base-uncased vocabulary that the `blingfire` package ships compiled in its wheel
(`pip install 'ldm_engine[bert]'`), read back once into the same {token: id} table. Nothing is downloaded;
either way the ids are those of transformers' BertTokenizer on that vocabulary, which the tests check.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import unicodedata
from pathlib import Path

from .tokenizer import PaddedRows

log = logging.getLogger(__name__)

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # longer words are [UNK], as BERT's WordpieceTokenizer does
BERT_BASE_VOCAB_SIZE = 30522


def _is_whitespace(c: str) -> bool:
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_punctuation(c: str) -> bool:
    cp = ord(c)  # every non-letter/number ASCII char counts as punctuation ("$", "^", "`" are not Unicode P*)
    return (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
            or unicodedata.category(c).startswith("P"))


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def basic_words(text: str, lowercase: bool = True, strip_accents: bool | None = None) -> list[str]:
    """BERT's basic tokenization: cleaned, lowercased, accent-stripped words with punctuation split off."""
    out = []
    for c in text:
        cp = ord(c)
        if cp == 0 or cp == 0xFFFD or _is_control(c):
            continue
        out.append(f" {c} " if _is_cjk(cp) else " " if _is_whitespace(c) else c)
    strip = lowercase if strip_accents is None else strip_accents
    words = []
    for word in unicodedata.normalize("NFC", "".join(out)).split():
        if lowercase:
            word = word.lower()
        if strip:
            word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        piece = ""
        for c in word:
            if _is_punctuation(c):
                words += [piece, c] if piece else [c]
                piece = ""
            else:
                piece += c
        if piece:
            words.append(piece)
    return words


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a tokenizer file (a JSON object was expected)")
    return doc


class _WordPiece:
    """WordPiece over a {token: id} vocabulary."""

    def __init__(self, vocab: dict[str, int], lowercase: bool = True, strip_accents: bool | None = None,
                 where: str = "vocabulary"):
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in vocab]
        if missing:
            raise ValueError(f"{where}: not a BERT WordPiece vocabulary (no {', '.join(missing)})")
        self.vocab, self.lowercase, self.strip_accents = vocab, lowercase, strip_accents
        self.inverse = {i: t for t, i in vocab.items()}
        self._special = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS if t in vocab) + ")")

    @classmethod
    def from_path(cls, path: Path) -> "_WordPiece":
        """vocab.txt, tokenizer.json, or a folder with either (and tokenizer_config.json's do_lower_case)."""
        options = {}
        if path.is_dir():
            files = [path / n for n in ("vocab.txt", "tokenizer.json") if (path / n).is_file()]
            if not files:
                raise FileNotFoundError(f"tokenizer folder {path} holds neither vocab.txt nor tokenizer.json")
            config = path / "tokenizer_config.json"
            if config.is_file():
                c = _read_json(config)
                options = {"lowercase": bool(c.get("do_lower_case", True)), "strip_accents": c.get("strip_accents")}
            path = files[0]
        if not path.is_file():
            raise FileNotFoundError(f"WordPiece vocabulary {path} does not exist")
        if path.suffix != ".json":
            tokens = path.read_text(encoding="utf-8").split("\n")
            tokens = tokens[:-1] if tokens and tokens[-1] == "" else tokens
            return cls({t.rstrip("\r"): i for i, t in enumerate(tokens)}, where=str(path), **options)
        doc = _read_json(path)
        model = doc.get("model") or {}
        if model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
            raise ValueError(f"{path}: not a WordPiece tokenizer (model type {model.get('type')!r})")
        norm = doc.get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":
            options = {"lowercase": bool(norm.get("lowercase", True)), "strip_accents": norm.get("strip_accents")}
        return cls(dict(model["vocab"]), where=str(path), **options)

    def word_pieces(self, word: str) -> list[int]:
        if len(word) > MAX_WORD_CHARS:
            return [self.vocab["[UNK]"]]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:  # the longest piece in the vocabulary
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.vocab["[UNK]"]]  # no piece fits: the whole word is unknown
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(self._special.split(text)):
            if i % 2:  # a special-token literal
                ids.append(self.vocab[part])
                continue
            for word in basic_words(part, self.lowercase, self.strip_accents):
                ids += self.word_pieces(word)
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.inverse.get(i, "[UNK]") for i in ids).replace(" ##", "")


@functools.cache
def embedded_vocab() -> dict[str, int]:
    """bert-base-uncased's vocabulary, read back from the id-to-word table compiled into the `blingfire` wheel.

    The table gives each id's text but not whether it is a word start or a `##` continuation; blingfire's
    own decoder tells: "a" followed by the id decodes to "a <piece>" for a word start and "a<piece>" for a
    continuation. Its [UNK]/[CLS]/[SEP]/[MASK] are stored lower-cased and get their usual spelling back."""
    try:
        import blingfire
        import numpy as np
    except ImportError:
        raise RuntimeError("the LDM text-to-image models read bert-base-uncased word pieces: pass the tokenizer "
                           "file (tokenizer='vocab.txt'), or pip install 'ldm_engine[bert]' (blingfire, which "
                           "ships that vocabulary)") from None
    table = blingfire.load_model(str(Path(blingfire.__file__).parent / "bert_base_tok.i2w"))
    try:
        vocab = {}
        a = 1037  # "a"
        for i in range(BERT_BASE_VOCAB_SIZE):
            text = blingfire.ids_to_text(table, np.array([i], dtype=np.int32), skip_special_tokens=False)
            pair = blingfire.ids_to_text(table, np.array([a, i], dtype=np.int32), skip_special_tokens=False)
            if pair not in ("a" + text, "a " + text):
                raise RuntimeError(f"blingfire's bert_base_tok.i2w decodes id {i} as {text!r} after 'a' as {pair!r}; "
                                   "this blingfire build is not the one ldm_engine reads; pass tokenizer='vocab.txt'")
            token = {"[unk]": "[UNK]", "[cls]": "[CLS]", "[sep]": "[SEP]", "[mask]": "[MASK]"}.get(text, text)
            vocab.setdefault(token if pair == "a " + text else "##" + token, i)
    finally:
        blingfire.free_model(table)
    return vocab


class WordPieceTokenizer(PaddedRows):
    """prompts -> LongTensor (B, max_length) of WordPiece ids: `[CLS] pieces [SEP] [PAD]...`.

    `vocab`: a vocab.txt / tokenizer.json file or a folder holding one (with tokenizer_config.json's
    do_lower_case), None for the bert-base-uncased vocabulary embedded in blingfire."""

    unit = "word pieces"

    def __init__(self, vocab: str | Path | None = None, max_length: int = 77):
        self._codec = (_WordPiece.from_path(Path(vocab)) if vocab is not None
                    else _WordPiece(embedded_vocab(), where="blingfire"))
        self.max_length = max_length
        v = self._codec.vocab
        self.bos_token_id, self.eos_token_id, self.pad_token_id = v["[CLS]"], v["[SEP]"], v["[PAD]"]
        self.unk_token_id = v["[UNK]"]
