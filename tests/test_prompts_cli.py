"""`ldm-generate` with clip skip, the prompt syntax and textual-inversion embeddings: the PNG parameters
record them the way A1111 writes them ("Clip skip: 2", "TI hashes: name: hash")."""
import hashlib

import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_engine.cli import main


def _embedding(path, seed):
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))}, path)
    return path


def test_clip_skip_and_embeddings_are_recorded(sd1_folder, tmp_path):
    style = _embedding(tmp_path / "mystyle.safetensors", 1)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    _embedding(folder / "fancy.safetensors", 2)
    _embedding(folder / "unused.safetensors", 3)
    out = tmp_path / "out.png"
    rc = main(["a mystyle fox, fancy BREAK snow", "--model", str(sd1_folder), "--steps", "1", "--size", "16x16",
               "--seed", "1", "--clip-skip", "2", "--embedding", str(style), "--embedding-dir", str(folder),
               "-o", str(out)])
    assert rc == 0
    text = Image.open(out).text
    sha = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (style, folder / "fancy.safetensors")}
    assert text["Clip skip"] == "2"
    assert text["TI hashes"] == f"mystyle: {sha['mystyle']}, fancy: {sha['fancy']}"  # used ones only
    assert "Clip skip: 2" in text["parameters"] and f"fancy: {sha['fancy']}" in text["parameters"]


def test_defaults_record_nothing_extra_and_plain_syntax_runs(sd1_folder, tmp_path):
    out = tmp_path / "plain.png"
    assert main(["a (red) circle", "--model", str(sd1_folder), "--steps", "1", "--size", "16x16",
                 "--prompt-syntax", "plain", "--clip-skip", "1", "-o", str(out)]) == 0
    text = Image.open(out).text
    assert "Clip skip" not in text and "TI hashes" not in text


def test_bad_prompt_options_exit_2_with_one_line(sd1_folder, tmp_path, capsys):
    common = ["x", "--model", str(sd1_folder), "--steps", "1", "--size", "16x16", "-o", str(tmp_path / "x.png")]
    assert main(common + ["--clip-skip", "9"]) == 2
    assert "clip_skip=9 is too large" in capsys.readouterr().err
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, wide)
    assert main(common + ["--embedding", str(wide)]) == 2
    assert "768 wide" in capsys.readouterr().err
    assert main(common + ["--embedding-dir", str(tmp_path / "nowhere")]) == 2
    assert "embedding folder" in capsys.readouterr().err
