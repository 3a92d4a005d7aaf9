"""Batch generation (`ldm-generate --prompts FILE --out DIR [--ray]`): prompts files are checked line by line,
runs resume, every PNG carries ldm-generate's parameters, and Ray Data workers give the same pixels."""
from __future__ import annotations

import inspect
import io
import json
import socket
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from ldm_engine import Pipeline
from ldm_engine.cli import main
from ldm_engine.serve.batch_job import ImageGenerator, ModelSpec, _check_reachable
from ldm_engine.serve.prompts_file import BatchError, line_keys, read_prompts, with_defaults

FAST = ["--steps", "2"]  # the embedded 64x64 model; the pixels only need to be compared, not good


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_txt_skips_blank_and_comment_lines(tmp_path):
    items = read_prompts(_write(tmp_path / "p.txt", ["# shapes", "a red circle", "", "  a blue square  ", "#x"]))
    assert [(it.index, it.line, it.args, it.name) for it in items] == [
        (0, 2, {"prompt": "a red circle"}, "00000.png"), (1, 4, {"prompt": "a blue square"}, "00001.png")]


def test_jsonl_reads_pipeline_arguments_and_aliases(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    lines = [json.dumps({"prompt": "a", "steps": 3, "seed": 9, "guidance_scale": 2.5, "sampler": "euler"}),
             "# a comment", json.dumps({"prompt": "b", "image": "in.png", "strength": 0.5, "negative": "blurry"})]
    items = read_prompts(_write(tmp_path / "p.jsonl", lines))
    assert items[0].args == {"prompt": "a", "num_inference_steps": 3, "seed": 9, "guidance_scale": 2.5,
                             "sampler": "euler"}
    assert items[1].line == 3 and items[1].args["image"] == str(tmp_path / "in.png")  # relative to the file
    assert items[1].args["negative_prompt"] == "blurry"
    # the job's options are defaults; seed: the line's own, else base + index
    full = with_defaults(items, {"num_inference_steps": 20, "guidance_scale": 4.0, "width": None}, seed=100)
    assert full[0].args["num_inference_steps"] == 3 and full[0].args["seed"] == 9
    assert full[1].args["num_inference_steps"] == 20 and full[1].args["seed"] == 101 and "width" not in full[1].args


def test_line_keys_are_pipeline_arguments():
    params = inspect.signature(Pipeline.__call__).parameters
    keys = line_keys()
    assert set(keys) <= set(params)
    assert {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "sampler", "seed", "width",
            "height", "eta", "clip_skip", "strength", "image", "mask_image"} <= set(keys)
    assert not {"latents", "generator", "callback", "num_images_per_prompt", "control_image"} & set(keys)


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a"}', '{"prompt": "b",'], "line 2: not valid JSON"),
    (['{"prompt": "a", "colour": "red"}'], "line 1: key 'colour' is unknown; use one of prompt"),
    (['# c', '{"prompt": "a", "latents": [1]}'], "line 2: key 'latents' is a Pipeline argument a prompts file cannot"),
    (['{"prompt": "a", "steps": "10"}'], "line 1: 'steps' must be an integer >= 1, got '10'"),
    (['{"prompt": "a", "seed": 1.5}'], "line 1: 'seed' must be an integer >= 0"),
    (['{"prompt": "a", "strength": 2}'], "line 1: 'strength' must be a number in [0, 1], got 2"),
    (['{"prompt": "a", "sampler": "heun9"}'], "line 1: unknown sampler 'heun9'; use one of"),
    (['{"prompt": "a", "steps": 2, "num_inference_steps": 3}'], "repeats 'num_inference_steps'"),
    (['{"prompt": "a", "image": "missing.png"}'], "line 1: image file"),
    (['["a", "b"]'], "line 1: expected a JSON object"),
    (['# only a comment', ''], "holds no prompts"),
])
def test_bad_lines_name_the_line_and_generate_nothing(tmp_path, capsys, lines, message):
    prompts = _write(tmp_path / "p.jsonl", lines)
    with pytest.raises(BatchError) as e:
        read_prompts(prompts)
    assert message in str(e.value)
    out = tmp_path / "out"
    assert main(["--prompts", str(prompts), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-generate: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()  # nothing generated, not even the folder


def test_bad_file_names(tmp_path):
    with pytest.raises(BatchError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(BatchError, match=r"must end in \.txt .* or \.jsonl"):
        read_prompts(_write(tmp_path / "p.csv", ["a"]))


@pytest.mark.parametrize("argv, message", [
    (["a cat", "--prompts", "P", "--out", "O"], "give a prompt or --prompts FILE, not both"),
    (["--prompts", "P"], "--prompts needs --out DIR"),
    (["a cat", "--ray"], "--ray goes with --prompts FILE"),
    (["a cat", "--out", "O", "--threads", "2"], "--out, --threads go with --prompts FILE"),
    (["--prompts", "P", "--out", "O", "--concurrency", "2"], "need --ray"),
    (["--prompts", "P", "--out", "O", "-o", "x.png"], "-o names one image"),
    (["--prompts", "P", "--out", "O", "--num", "2"], "--num 2 does not apply to --prompts"),
    (["--prompts", "P", "--out", "O", "--ray", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--prompts", "P", "--out", "O", "--ray", "--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
    (["--prompts", "P", "--out", "O", "--image", "missing.png"], "--image file 'missing.png' does not exist"),
    (["--prompts", "P", "--out", "O", "--label-map", "l.png"], "--label-map does not apply to --prompts"),
    (["--prompts", "P", "--out", "O", "--layout", "[[1, [0, 0, 1, 1]]]"], "--layout does not apply to --prompts"),
    (["--prompts", "P", "--out", "O", "--tile"], "--tile does not apply to --prompts"),
])
def test_batch_options_are_checked(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "P", ["a cat"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-generate: error: ") and message in err
    assert not (tmp_path / "O").exists()


def test_unreachable_ray_address_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BatchError, match="no Ray cluster answers at"):
        _check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(BatchError, match="HOST:PORT"):
        _check_reachable("head-node")


def test_same_image_and_parameters_as_one_image_runs(tmp_path, capsys):
    prompts = _write(tmp_path / "p.txt", ["a red circle on a blue background", "a green square"])
    assert main(["--prompts", str(prompts), "--out", str(tmp_path / "out"), "--seed", "40", "--negative", "blurry",
                 *FAST]) == 0
    for i, prompt in enumerate(["a red circle on a blue background", "a green square"]):
        single = tmp_path / f"single{i}.png"
        assert main([prompt, "--seed", str(40 + i), "--negative", "blurry", "-o", str(single), *FAST]) == 0
        batch = Image.open(tmp_path / "out" / f"0000{i}.png")
        assert np.array_equal(_pixels(single), np.asarray(batch.convert("RGB")))
        assert batch.text == Image.open(single).text  # every chunk, `parameters` included
        assert f"Seed: {40 + i}" in batch.text["parameters"] and "Negative prompt: blurry" in batch.text["parameters"]
    capsys.readouterr()


def test_resumes_skipping_existing_images(tmp_path, capsys):
    prompts = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": p}) for p in ("a", "b", "c")])
    out = tmp_path / "out"
    argv = ["--prompts", str(prompts), "--out", str(out), *FAST]
    assert main(argv) == 0
    names = ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in out.iterdir()) == names  # no temp files left
    first = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in names}
    assert "wrote 3 images" in capsys.readouterr().out

    assert main(argv) == 0
    assert "skipping 3 of 3" in capsys.readouterr().out
    assert all((out / n).stat().st_mtime_ns == first[n][1] for n in names)

    (out / "00001.png").unlink()
    assert main(argv) == 0
    assert "skipping 2 of 3" in capsys.readouterr().out
    assert (out / "00000.png").stat().st_mtime_ns == first["00000.png"][1]
    assert (out / "00002.png").stat().st_mtime_ns == first["00002.png"][1]
    assert (out / "00001.png").read_bytes() == first["00001.png"][0]  # regenerated, the same file
    assert "Seed: 1," in Image.open(out / "00001.png").text["parameters"]


def test_a_failing_line_stops_the_job_and_names_it(tmp_path, capsys):
    lines = [json.dumps({"prompt": "a"}), json.dumps({"prompt": "b", "width": 60}), json.dumps({"prompt": "c"})]
    out = tmp_path / "out"
    assert main(["--prompts", str(_write(tmp_path / "p.jsonl", lines)), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "line 2 (00001.png): width must be a multiple of" in err
    assert sorted(p.name for p in out.iterdir()) == ["00000.png"]  # what was done stays; a rerun resumes


def test_ray_worker_answers_errors_per_row(tmp_path):
    """The callable class Ray Data runs, called directly: PNG bytes per row, a message instead of raising."""
    from ldm_engine.cli import model_hash
    from ldm_engine.defaults import default_model

    spec = ModelSpec(str(default_model()), model_hash(default_model()), threads=1)
    worker = ImageGenerator(asdict(spec))
    base = {"num_inference_steps": 1, "guidance_scale": 4.0}
    batch = {"index": np.array([0, 1]), "line": np.array([1, 2]),
             "args": np.array([json.dumps({**base, "prompt": "a", "seed": 0}),
                               json.dumps({**base, "prompt": "b", "seed": 1, "height": 20})]),
             "image": np.array([b"", b""], dtype=object), "mask_image": np.array([b"", b""], dtype=object)}
    out = worker(batch)
    assert list(out["name"]) == ["00000.png", "00001.png"]
    assert Image.open(io.BytesIO(out["png"][0])).size == (64, 64) and out["error"][0] == ""
    assert out["png"][1] == b"" and "line 2 (00001.png): height must be a multiple of" in out["error"][1]

    broken = ImageGenerator(asdict(ModelSpec(str(tmp_path / "missing.safetensors"), "0", threads=1)))
    assert "missing.safetensors" in broken(batch)["error"][0]


def test_ray_data_gives_the_same_images_as_local(ray_instance, tmp_path, capsys):
    pytest.importorskip("ray.data")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    mask.save(tmp_path / "mask.png")
    lines = [{"prompt": f"a {c} {s} on a {b} background"} for c, s, b in [
        ("red", "circle", "blue"), ("green", "square", "white"), ("yellow", "triangle", "black"),
        ("blue", "circle", "red"), ("white", "square", "green"), ("black", "triangle", "yellow"),
        ("red", "square", "white"), ("green", "circle", "black")]]
    lines[2].update(seed=123, guidance_scale=2.0, sampler="euler")
    lines[5].update(image="in.png", strength=0.7)  # input images travel to the workers as bytes
    lines[6].update(image="in.png", mask_image="mask.png")
    prompts = _write(tmp_path / "p.jsonl", [json.dumps(line) for line in lines])
    common = ["--prompts", str(prompts), "--steps", "4", "--seed", "7"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    # 2 workers of half a CPU each: they fit beside whatever else holds the test instance's 2 CPUs
    assert main([*common, "--out", str(tmp_path / "ray"), "--ray", ray_instance, "--concurrency", "2",
                 "--batch-size", "2", "--cpus-per-worker", "0.5"]) == 0
    assert "wrote 8 images" in capsys.readouterr().out
    names = [f"{i:05d}.png" for i in range(8)]
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == names
    for name in names:
        local, ray = Image.open(tmp_path / "local" / name), Image.open(tmp_path / "ray" / name)
        assert np.array_equal(np.asarray(local.convert("RGB")), np.asarray(ray.convert("RGB"))), name
        assert local.text == ray.text


def test_lora_and_model_options_apply_to_every_line(sd1_folder, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    g = torch.Generator().manual_seed(0)
    lora = tmp_path / "style.safetensors"
    save_file({f"{q}.lora_down.weight": torch.randn(4, 32, generator=g),
               f"{q}.lora_up.weight": torch.randn(32, 4, generator=g), f"{q}.alpha": torch.tensor(4.0)}, str(lora))
    common = ["--model", str(sd1_folder), "--lora", f"{lora}:0.5", "--size", "16x16", "--sampler", "euler", *FAST]
    prompts = _write(tmp_path / "p.txt", ["a photo of a cat", "a photo of a dog"])
    assert main(["--prompts", str(prompts), "--out", str(tmp_path / "out"), "--seed", "3", *common]) == 0
    for i, prompt in enumerate(["a photo of a cat", "a photo of a dog"]):
        assert main([prompt, "--seed", str(3 + i), "-o", str(tmp_path / f"s{i}.png"), *common]) == 0
        single, batch = Image.open(tmp_path / f"s{i}.png"), Image.open(tmp_path / "out" / f"0000{i}.png")
        assert np.array_equal(np.asarray(single), np.asarray(batch))
        assert batch.text == single.text and batch.text["prompt"] == f"{prompt}<lora:style:0.5>"
        assert "Lora hashes" in batch.text and "Sampler: Euler" in batch.text["parameters"]
    capsys.readouterr()
