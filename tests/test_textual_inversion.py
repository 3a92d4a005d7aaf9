"""Textual-inversion embeddings: every file format, parity with diffusers' load_textual_inversion
(prompt embeddings and whole images, single- and multi-vector, SD1 and SD2 folders), weighted parts,
chunk boundaries, folders loaded by file stem, bit-exact unloading, and clear errors that leave the
model untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_engine import Pipeline
from ldm_engine.prompts.textual_inversion import find_triggers, read_embedding_file

W = 32  # the tiny text encoders' width (768 for SD1, 1024 for SD2 at full size)


def _vectors(n, seed, width=W):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("embeddings")
    save_file({"<cat-toy>": _vectors(1, 1)[0]}, d / "learned_embeds.safetensors")  # diffusers, single vector
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _vectors(3, 2)}, "name": "trained-name",
                "step": 500, "sd_checkpoint": None, "sd_checkpoint_name": None}, d / "mystyle.pt")  # A1111, 3 vectors
    save_file({"emb_params": _vectors(2, 3)}, d / "kohya-style.safetensors")  # A1111 / kohya safetensors
    torch.save({"<bin-token>": _vectors(2, 4)}, d / "learned_embeds.bin")  # diffusers .bin, 2 vectors
    old = torch.nn.ParameterDict({"*": torch.nn.Parameter(_vectors(1, 5))})  # early A1111 files
    torch.save({"string_to_param": old, "name": "old"}, d / "oldstyle.pt")
    return d


@pytest.fixture(scope="module")
def diffusers_ref(sd1_folder, files):
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(files / "learned_embeds.safetensors"))
    ref.load_textual_inversion(str(files / "mystyle.pt"), token="mystyle")
    return ref


def test_every_file_format_reads(files):
    cases = {"learned_embeds.safetensors": ("<cat-toy>", 1), "mystyle.pt": (None, 3), "kohya-style.safetensors": (None, 2),
             "learned_embeds.bin": ("<bin-token>", 2), "oldstyle.pt": (None, 1)}
    for name, (trigger, n) in cases.items():
        named, vectors = read_embedding_file(files / name)
        assert named == trigger and vectors.shape == (n, W) and vectors.dtype == torch.float32, name


def test_triggers_follow_the_file_the_token_or_the_key(sd1_folder, files):
    pipe = Pipeline.from_pretrained(sd1_folder)
    assert pipe.load_textual_inversion(files / "mystyle.pt") == "mystyle"  # A1111: the file stem
    assert pipe.load_textual_inversion(files / "kohya-style.safetensors") == "kohya-style"
    assert pipe.load_textual_inversion(files / "learned_embeds.safetensors") == "<cat-toy>"  # diffusers: its key
    assert pipe.load_textual_inversion(files / "learned_embeds.bin", token="<other>") == "<other>"
    assert pipe.load_textual_inversion(files / "oldstyle.pt") == "oldstyle"
    loaded = pipe.textual_inversions
    assert list(loaded) == ["mystyle", "kohya-style", "<cat-toy>", "<other>", "oldstyle"]
    ids = [i for e in loaded.values() for i in e.ids]
    assert ids == list(range(1000, 1009))  # appended after the 1000-row table, 3+2+1+2+1 vectors
    assert len(loaded["mystyle"].hash) == 12
    table = pipe.model.text_encoder.embeddings.token_embedding.weight
    assert torch.equal(table[1000:1003], loaded["mystyle"].vectors)


@pytest.mark.parametrize("prompt, negative", [
    ("a photo of <cat-toy> on a mystyle table", "blurry mystyle"),  # single and multi-vector, negative too
    ("mystyle, <cat-toy>", ""),
])
def test_prompt_embeddings_match_diffusers(sd1_folder, files, diffusers_ref, prompt, negative):
    pipe = Pipeline.from_pretrained(sd1_folder)
    pipe.load_textual_inversion(files / "learned_embeds.safetensors")
    pipe.load_textual_inversion(files / "mystyle.pt")
    expected, expected_neg = diffusers_ref.encode_prompt(prompt, "cpu", 1, True, negative)
    got, got_neg = pipe.encode_prompt(prompt, negative)
    assert (got - expected).abs().max() <= 1e-5 and (got_neg - expected_neg).abs().max() <= 1e-5
    plain, _ = pipe.encode_prompt(prompt.replace("<cat-toy>", "cat").replace("mystyle", "style"))
    assert (got - plain).abs().max() > 1e-2  # the embeddings did enter


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_images_match_diffusers(sd1_folder, files, diffusers_ref, sampler):
    import diffusers

    pipe = Pipeline.from_pretrained(sd1_folder)
    pipe.load_textual_inversion(files / "learned_embeds.safetensors")
    pipe.load_textual_inversion(files / "mystyle.pt")
    ref = diffusers_ref
    if sampler == "euler":
        ref = diffusers.StableDiffusionPipeline(**diffusers_ref.components)
        ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
        ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, guidance_scale=6.0, height=16, width=24, output_type="np")
    prompts, negatives = ["a photo of <cat-toy>", "a mystyle fox"], ["mystyle", "blurry"]
    expected = ref(prompts, negative_prompt=negatives, generator=torch.Generator().manual_seed(5), **kw).images
    got = pipe(prompts, negative_prompt=negatives, seed=5, sampler=sampler, progress=False, **kw).images
    assert np.abs(got - expected).max() <= 2 / 255


def test_sd2_folder_takes_its_own_width(sd2_folder, files):
    import diffusers

    pipe = Pipeline.from_pretrained(sd2_folder)
    pipe.load_textual_inversion(files / "mystyle.pt")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd2_folder, safety_checker=None,
                                                            requires_safety_checker=False)
    ref.load_textual_inversion(str(files / "mystyle.pt"), token="mystyle")
    expected, _ = ref.encode_prompt("a mystyle castle", "cpu", 1, False)
    assert (pipe.encode_prompt("a mystyle castle")[0] - expected).abs().max() <= 1e-5


def test_weighted_parts_and_chunk_boundaries(sd1_folder, files):
    pipe = Pipeline.from_pretrained(sd1_folder)
    pipe.load_textual_inversion(files / "mystyle.pt")
    rows = pipe.textual_inversions["mystyle"].ids
    (chunk,) = pipe.prompts.chunks("a (mystyle:1.3) fox")
    i = chunk.ids.index(rows[0])
    assert tuple(chunk.ids[i:i + 3]) == rows and chunk.weights[i:i + 3] == [1.3] * 3
    filler = "a " * 74  # 74 one-token words: 1 slot left, the 3 vectors move whole to the next chunk
    first, second = pipe.prompts.chunks(filler + "mystyle")
    assert rows[0] not in first.ids and tuple(second.ids[1:4]) == rows
    context, _ = pipe.encode_prompt(filler + "mystyle")
    assert context.shape == (1, 154, W)
    assert (context[:, 77:] - pipe.encode_prompt("mystyle")[0]).abs().max() <= 1e-5


def test_trigger_matching_is_whole_words():
    found = find_triggers("mystyle, Mystyle mystyles my-mystyle <cat-toy>, x<cat-toy>y", ["mystyle", "<cat-toy>"])
    assert [(s, t) for s, _, t in found] == [(0, "mystyle"), (9, "mystyle"), (29, "mystyle"), (37, "<cat-toy>"),
                                            (49, "<cat-toy>")]
    assert find_triggers("easynegative", ["easy", "easynegative"])[0][2] == "easynegative"  # longest first


def test_unloading_restores_the_table_bit_exactly(sd1_folder, files):
    pipe = Pipeline.from_pretrained(sd1_folder)
    table = pipe.model.text_encoder.embeddings.token_embedding
    original, saved = table.weight, table.weight.detach().clone()
    before = pipe.encode_prompt("a mystyle fox")[0]
    pipe.load_textual_inversion(files / "mystyle.pt")
    pipe.load_textual_inversion(files / "learned_embeds.safetensors")
    assert table.weight.shape == (1004, W) and not torch.equal(pipe.encode_prompt("a mystyle fox")[0], before)
    pipe.unload_textual_inversions()
    assert table.weight is original and torch.equal(table.weight, saved) and table.num_embeddings == 1000
    assert pipe.textual_inversions == {} and torch.equal(pipe.encode_prompt("a mystyle fox")[0], before)


def test_folders_load_embeddings_named_in_prompts(sd1_folder, files, tmp_path):
    import shutil

    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(files / "mystyle.pt", folder / "sub" / "mystyle.pt")
    shutil.copy(files / "kohya-style.safetensors", folder / "kohya-style.safetensors")
    (folder / "broken.pt").write_bytes(b"not a pickle")
    torch.save({"emb_params": _vectors(1, 9)}, folder / "a.pt")  # "a" is a vocabulary word: never used
    pipe = Pipeline.from_pretrained(sd1_folder, embedding_dirs=[folder])
    pipe.encode_prompt("a red circle")
    assert pipe.textual_inversions == {}  # nothing named, nothing loaded (the broken file is never read)
    lazy, _ = pipe.encode_prompt("a mystyle fox")
    assert list(pipe.textual_inversions) == ["mystyle"]
    explicit = Pipeline.from_pretrained(sd1_folder)
    explicit.load_textual_inversion(files / "mystyle.pt")
    assert torch.equal(lazy, explicit.encode_prompt("a mystyle fox")[0])
    assert [e.name for e in pipe.prompts.used_embeddings(["kohya-style", "x"])] == ["kohya-style"]
    with pytest.raises(ValueError, match="broken.pt"):
        pipe.encode_prompt("a broken fox")
    assert list(pipe.textual_inversions) == ["mystyle", "kohya-style"]
    with pytest.raises(FileNotFoundError, match="embedding folder"):
        Pipeline.from_pretrained(sd1_folder, embedding_dirs=[tmp_path / "nowhere"])


def _write(path, data):
    if path.suffix == ".safetensors":
        save_file(data, path)
    else:
        torch.save(data, path)
    return path


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("name, data, token, message", [
    ("sd1-wide.pt", {"string_to_param": {"*": torch.zeros(2, 768)}}, None,
     r"768 wide \(SD1, CLIP ViT-L\), but this model's text encoder is 32 wide"),
    ("clash.safetensors", {"emb_params": torch.zeros(1, W)}, "a", "already a word of the tokenizer's vocabulary.*token="),
    ("nan.safetensors", {"emb_params": torch.full((1, W), float("nan"))}, None, "NaN"),
    ("two.pt", {"string_to_param": {"*": torch.zeros(1, W), "x": torch.zeros(1, W)}}, None, "holds 2 embeddings"),
    ("sdxl.safetensors", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, None, "SDXL"),
    ("odd.pt", {"weights": torch.zeros(1, W), "more": torch.zeros(1, W)}, None, "not a textual-inversion embedding"),
    ("cube.safetensors", {"emb_params": torch.zeros(1, 1, W)}, None, r"got shape \(1, 1, 32\)"),
    ("code.pt", {"string_to_param": {"*": _RunsCode()}}, None, "weights_only"),
])
def test_bad_files_are_refused_and_leave_the_model_untouched(sd1_folder, tmp_path, name, data, token, message, capsys):
    pipe = Pipeline.from_pretrained(sd1_folder)
    table = pipe.model.text_encoder.embeddings.token_embedding
    original = table.weight
    with pytest.raises(ValueError, match=message):
        pipe.load_textual_inversion(_write(tmp_path / name, data), token=token)
    assert table.weight is original and pipe.textual_inversions == {}
    assert "this ran" not in capsys.readouterr().out


def test_empty_unreadable_missing_files_and_taken_triggers(sd1_folder, files, tmp_path):
    pipe = Pipeline.from_pretrained(sd1_folder)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        pipe.load_textual_inversion(tmp_path / "empty.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read"):
        pipe.load_textual_inversion(tmp_path / "garbage.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.load_textual_inversion(tmp_path / "missing.pt")
    pipe.load_textual_inversion(files / "mystyle.pt")
    assert pipe.load_textual_inversion(files / "mystyle.pt") == "mystyle"  # the same file again: a no-op
    with pytest.raises(ValueError, match="trigger 'MyStyle' is already taken by .*mystyle.pt"):
        pipe.load_textual_inversion(files / "kohya-style.safetensors", token="MyStyle")
    assert list(pipe.textual_inversions) == ["mystyle"]
