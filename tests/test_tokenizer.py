"""CLIP tokenizer ids equal transformers' CLIPTokenizer: on a vocabulary trained here and on the real
CLIP vocabulary (the one embedded in instant-clip-tokenizer, written out as vocab.json/merges.txt)."""
import logging

import pytest

from conftest import write_tiny_vocab
from ldm_engine.models import CLIPTokenizer
from ldm_engine.models.tokenizer import write_clip_vocab

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


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory):
    """vocab.json/merges.txt rebuilt from the CLIP BPE merges text that instant-clip-tokenizer embeds."""
    try:
        return write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))
    except RuntimeError as e:
        pytest.skip(str(e))


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


def test_tokenizer_json_only_folder_matches_transformers(tmp_path):
    """transformers 5 saves a tokenizer as tokenizer.json alone (no vocab.json / merges.txt): the folder
    still loads, with the same ids, and a diffusers folder's pad token is still found."""
    from transformers import CLIPTokenizer as HFTokenizer

    from ldm_engine.loading.checkpoint import _pad_id

    src = write_tiny_vocab(tmp_path / "tok")
    saved = tmp_path / "saved"
    HFTokenizer.from_pretrained(str(src), pad_token="<|endoftext|>").save_pretrained(str(saved))
    if (saved / "vocab.json").exists():
        (saved / "vocab.json").unlink()
        (saved / "merges.txt").unlink()
    assert (saved / "tokenizer.json").is_file()
    assert CLIPTokenizer(saved)(PROMPTS).tolist() == hf_ids(src, PROMPTS)
    assert _pad_id(saved) == CLIPTokenizer(saved).eos_token_id


def test_folder_without_tokenizer_files_names_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt, or tokenizer.json"):
        CLIPTokenizer(tmp_path)
