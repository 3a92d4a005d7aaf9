"""Bad files and configs end in one clear CheckpointError (or ValueError) naming the problem, never a
crash, a hang, a partial model or code execution."""
import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ldm_engine import CheckpointError, load_checkpoint
from ldm_engine.loading.files import read_state_dict
from test_loading import random_model_file


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return random_model_file(tmp_path_factory.mktemp("bad") / "tiny.safetensors", "tiny-sd1")


def test_truncated_safetensors(tiny_file, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(bad, config="tiny-sd1")


def test_text_file_renamed_ckpt(tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("these are my notes, not a model\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(bad)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": _RunsCode(marker)}, bad)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(bad)
    assert not marker.exists()


def test_missing_keys_named(tiny_file, tmp_path):
    sd = load_file(str(tiny_file))
    del sd["model.diffusion_model.out.2.weight"]
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: out\.2\.weight"):
        load_checkpoint(tmp_path / "m.safetensors", config="tiny-sd1")


def test_wrong_shape_named(tiny_file, tmp_path):
    sd = load_file(str(tiny_file))
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"quant_conv\.weight: file \(8, 8, 3, 3\) vs model \(8, 8, 1, 1\)"):
        load_checkpoint(tmp_path / "m.safetensors", config="tiny-sd1")


def test_not_an_ldm_checkpoint(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a latent-diffusion checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_unknown_preset(tiny_file):
    with pytest.raises(ValueError, match="unknown preset 'sd-9'.*known presets: .*sd-1.5"):
        load_checkpoint(tiny_file, config="sd-9")


def test_yaml_that_is_not_an_ldm(tmp_path, tiny_file):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("trainer:\n  max_epochs: 3\nmodel:\n  target: torchvision.models.resnet50\n")
    with pytest.raises(CheckpointError, match="not a latent-diffusion config"):
        load_checkpoint(tiny_file, config=cfg)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="unknown weights format"):
        load_checkpoint(tmp_path / "w.onnx")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_checkpoint(tmp_path)


def test_diffusers_folder_without_weights(sd1_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd1_folder, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_checkpoint(broken)


# ---- property-based: mutated headers and random bytes ----------------------------------------------

def _valid_bytes():
    from safetensors.torch import save

    return save({"model.diffusion_model.a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                 "first_stage_model.b": torch.ones(4)})


VALID = _valid_bytes()


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_random_bytes_never_crash(tmp_path, data):
    for suffix in (".safetensors", ".ckpt"):
        f = tmp_path / f"r{suffix}"
        f.write_bytes(data)
        try:
            read_state_dict(f)
        except CheckpointError:
            pass


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(0, len(VALID) - 1), byte=st.integers(0, 255), cut=st.integers(0, len(VALID)))
def test_mutated_safetensors_never_crash(tmp_path, pos, byte, cut):
    data = bytearray(VALID)
    data[pos] = byte
    f = tmp_path / "m.safetensors"
    f.write_bytes(bytes(data[:cut]))
    try:
        sd = read_state_dict(f)
    except CheckpointError:
        return
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=8), st.one_of(
    st.none(), st.integers(), st.text(max_size=5),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I64", "XX", ""]),
                           "shape": st.lists(st.integers(-2, 4), max_size=3),
                           "data_offsets": st.lists(st.integers(-8, 64), min_size=0, max_size=3)})), max_size=4),
       payload=st.binary(max_size=64))
def test_forged_headers_never_crash(tmp_path, header, payload):
    raw = json.dumps(header).encode()
    f = tmp_path / "h.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    try:
        read_state_dict(f)
    except CheckpointError:
        pass
