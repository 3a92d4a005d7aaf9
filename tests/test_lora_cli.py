"""`ldm-generate --lora FILE[:SCALE]` and `--lora-dir DIR` with prompt tags; the PNG parameters record
the LoRAs as A1111 does: weights as <lora:NAME:W> tags in the prompt, "Lora hashes" with the addnet hash."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from test_lora_keys import save_tensors

from ldm_engine.cli import _lora, main

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"


def _file(path):
    g = torch.Generator().manual_seed(0)
    return save_tensors(path, {f"{Q}.lora_down.weight": torch.randn(4, 32, generator=g),
                               f"{Q}.lora_up.weight": torch.randn(32, 4, generator=g), f"{Q}.alpha": torch.tensor(4.0)},
                        metadata={"ss_output_name": "style"})


def addnet_hash(path) -> str:
    """kohya-ss / A1111: sha256 of the safetensors bytes after the 8-byte length and the JSON header."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_lora_flag_and_prompt_tag_give_one_picture_and_record_it(sd1_folder, tmp_path, capsys):
    (tmp_path / "loras").mkdir()
    path = _file(tmp_path / "loras" / "style.safetensors")
    common = ["--model", str(sd1_folder), "--steps", "2", "--seed", "3", "--size", "16x16"]
    assert main(["a photo of a cat", "--lora", f"{path}:0.5", "-o", str(tmp_path / "flag.png")] + common) == 0
    assert main(["a photo of a cat <lora:style:0.5>", "--lora-dir", str(tmp_path / "loras"),
                 "-o", str(tmp_path / "tag.png")] + common) == 0
    assert main(["a photo of a cat", "-o", str(tmp_path / "none.png")] + common) == 0
    flag, tag, none = (Image.open(tmp_path / f"{n}.png") for n in ("flag", "tag", "none"))
    np.testing.assert_array_equal(np.asarray(flag), np.asarray(tag))
    assert np.abs(np.asarray(flag, np.float32) - np.asarray(none, np.float32)).max() > 2
    expected = f"style: {addnet_hash(path)}"
    assert flag.text["Lora hashes"] == tag.text["Lora hashes"] == expected
    assert flag.text["prompt"] == "a photo of a cat<lora:style:0.5>"
    assert tag.text["prompt"] == "a photo of a cat <lora:style:0.5>"
    assert "Lora hashes" not in none.text


def test_lora_argument_parsing():
    assert _lora("a/b.safetensors:0.7") == (Path("a/b.safetensors"), 0.7)
    assert _lora("a/b.safetensors") == (Path("a/b.safetensors"), 1.0)
    assert _lora("C:/x/b.safetensors") == (Path("C:/x/b.safetensors"), 1.0)
    assert _lora("b.safetensors:-1") == (Path("b.safetensors"), -1.0)


def test_bad_lora_is_one_line_and_exit_2(sd1_folder, tmp_path, capsys):
    common = ["x", "--model", str(sd1_folder), "--steps", "1", "--size", "16x16", "-o", str(tmp_path / "o.png")]
    assert main(common + ["--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such LoRA file" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    assert main(["x <lora:nope:1>"] + common[1:] + ["--lora-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "no LoRA named 'nope'" in err and err.count("\n") == 1
