"""CLIP tokenizer ids equal transformers' CLIPTokenizer: on a vocabulary trained here and on the real
CLIP vocabulary (the one embedded in instant-clip-tokenizer, written out as vocab.json/merges.txt)."""
import json
import logging
from pathlib import Path

import pytest

from conftest import write_tiny_vocab
from ldm_engine.models import CLIPTokenizer

PROMPTS = [
    "a photo of a cat",
    "A Photo   of a CAT!!",
    "an astronaut riding a horse on mars, trending on artstation, 4k, 1024x768",
    "it's the dog's toy; they'll've gone -- (masterpiece:1.2) [best quality]",
    "café naïve résumé — Ünïcödé",
    "東京の夜景 🌃 neon lights",
    "",
    "   leading and trailing spaces   ",
    " ".join(["word"] * 100),  # longer than 77 tokens: truncated
    "red, green, blue, yellow, purple, orange, white, black " * 8,
]


def hf_ids(folder, prompts, pad="<|endoftext|>"):
    from transformers import CLIPTokenizer as HFTokenizer

    tok = HFTokenizer.from_pretrained(str(folder), pad_token=pad)
    return tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids


def bytes_to_unicode():
    """CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory):
    """vocab.json/merges.txt rebuilt from the CLIP BPE merges text that instant-clip-tokenizer embeds."""
    import instant_clip_tokenizer

    lib = next(Path(instant_clip_tokenizer.__file__).parent.glob("instant_clip_tokenizer*.so"))
    data = lib.read_bytes()
    start = data.find(b"#version: 0.2\n")
    if start < 0:
        pytest.skip("this build of instant-clip-tokenizer does not carry the merges as text")
    n_merges = 49152 - 256 - 2
    lines = data[start:].split(b"\n")[1:1 + n_merges]
    merges = [tuple(line.decode("utf-8").split()) for line in lines]
    assert all(len(m) == 2 for m in merges)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_vocab")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return folder


def test_tiny_vocab_matches_transformers(tmp_path):
    folder = write_tiny_vocab(tmp_path / "tok")
    ours = CLIPTokenizer(folder)
    assert ours(PROMPTS).tolist() == hf_ids(folder, PROMPTS)


def test_real_vocab_files_match_transformers(real_vocab):
    ours = CLIPTokenizer(real_vocab)
    assert ours(PROMPTS).tolist() == hf_ids(real_vocab, PROMPTS)


def test_embedded_vocab_matches_transformers(real_vocab):
    ours = CLIPTokenizer()  # no files: the vocabulary inside instant-clip-tokenizer
    assert ours(PROMPTS).tolist() == hf_ids(real_vocab, PROMPTS)


def test_known_clip_ids():
    ids = CLIPTokenizer()(["a photo of a cat"])[0].tolist()
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [49407] * 70 and len(ids) == 77


def test_openclip_padding_is_zero():
    ids = CLIPTokenizer(pad_token_id=0)(["a photo of a cat"])[0].tolist()
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[7:] == [0] * 70


def test_long_prompt_warns_with_dropped_words(caplog):
    tok = CLIPTokenizer()
    prompt = " ".join(["cat"] * 75) + " zebra giraffe"
    with caplog.at_level(logging.WARNING):
        ids = tok([prompt])[0].tolist()
    assert len(ids) == 77 and ids[-1] == 49407
    assert "zebra giraffe" in caplog.text


def test_decode_round_trip():
    tok = CLIPTokenizer()
    assert tok.decode(tok(["a red circle on a blue background"])[0]) == "a red circle on a blue background"


def test_folder_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        CLIPTokenizer(tmp_path)
