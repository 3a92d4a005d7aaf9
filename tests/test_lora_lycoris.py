"""LoCon, CP (lora_mid), LoHa, LoKr and DoRA against their formulas written out here on the weights
(independently of the merging code: loops, explicit Kronecker blocks); PEFT DoRA against diffusers."""
from __future__ import annotations

import pytest
import torch

from test_lora_keys import save_tensors, weights

from ldm_engine import Pipeline
from ldm_engine.loading import random_model

ATOL = 1e-6
Q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # Linear (32, 32)
FF = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"  # Linear (512, 64)
CONV = "lora_unet_input_blocks_4_0_in_layers_2"  # ResBlock conv (64, 32, 3, 3)
SKIP = "lora_unet_input_blocks_4_0_skip_connection"  # 1x1 conv (64, 32, 1, 1)
DOWN = "lora_unet_input_blocks_3_0_op"  # the downsampler's conv (32, 32, 3, 3)
PARAM = {Q: "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
         FF: "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight",
         CONV: "input_blocks.4.0.in_layers.2.weight", SKIP: "input_blocks.4.0.skip_connection.weight",
         DOWN: "input_blocks.3.0.op.weight"}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(random_model("tiny-sd1", seed=3))


def r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 17 * len(shape))) * 0.2


def merged(pipe, tmp_path, tensors: dict, scale: float, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(original, merged) weight of `module` after loading `tensors` at `scale`; unloaded again."""
    w0 = weights(pipe.model)["unet." + PARAM[module]]
    pipe.load_lora(save_tensors(tmp_path / "x.safetensors", tensors), scale=scale)
    w1 = weights(pipe.model)["unet." + PARAM[module]]
    pipe.unload_loras()
    return w0, w1


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product by blocks: out[i*B + k, j*D + l, ...] = a[i, j] * b[k, l, ...]."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def tucker_loops(t, wa, wb):
    """W[o, i, h, w] = Σ_a Σ_b t[a, b, h, w] · wa[a, o] · wb[b, i], summed term by term."""
    out = torch.zeros(wa.shape[1], wb.shape[1], *t.shape[2:])
    for a in range(t.shape[0]):
        for b in range(t.shape[1]):
            out += t[a, b][None, None] * wa[a][:, None, None, None] * wb[b][None, :, None, None]
    return out


@pytest.mark.parametrize("alpha,expected_scale", [(2.0, 0.5), (None, 1.0), (0.0, 1.0)])
def test_lora_linear_alpha_over_rank(pipe, tmp_path, alpha, expected_scale):
    down, up = r(4, 32, seed=1), r(32, 4, seed=2)
    t = {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up}
    if alpha is not None:
        t[f"{Q}.alpha"] = torch.tensor(alpha)
    w0, w1 = merged(pipe, tmp_path, t, 0.8, Q)
    torch.testing.assert_close(w1, w0 + 0.8 * expected_scale * up @ down, atol=ATOL, rtol=0)


@pytest.mark.parametrize("module", [CONV, DOWN, SKIP])
def test_locon_convolutions(pipe, tmp_path, module):
    out, inp, k = {CONV: (64, 32, 3), DOWN: (32, 32, 3), SKIP: (64, 32, 1)}[module]
    down, up = r(4, inp, k, k, seed=3), r(out, 4, 1, 1, seed=4)
    t = {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up, f"{module}.alpha": torch.tensor(8.0)}
    w0, w1 = merged(pipe, tmp_path, t, 0.5, module)
    delta = sum(up[:, a, 0, 0][:, None, None, None] * down[a][None] for a in range(4))
    torch.testing.assert_close(w1, w0 + 0.5 * 2.0 * delta, atol=ATOL, rtol=0)


def test_cp_decomposed_conv_lora(pipe, tmp_path):
    """lora_mid: the Tucker core of a conv LoRA (LoCon use_tucker; kohya 'lora_mid')."""
    down, mid, up = r(3, 32, 1, 1, seed=5), r(3, 3, 3, 3, seed=6), r(64, 3, 1, 1, seed=7)
    t = {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_mid.weight": mid, f"{CONV}.lora_up.weight": up,
         f"{CONV}.alpha": torch.tensor(3.0)}
    w0, w1 = merged(pipe, tmp_path, t, 1.0, CONV)
    delta = tucker_loops(mid, up[:, :, 0, 0].T, down[:, :, 0, 0])
    torch.testing.assert_close(w1, w0 + delta, atol=ATOL, rtol=0)


def test_loha_linear_and_conv(pipe, tmp_path):
    w1a, w1b, w2a, w2b = r(512, 4, seed=8), r(4, 64, seed=9), r(512, 4, seed=10), r(4, 64, seed=11)
    t = {f"{FF}.hada_w1_a": w1a, f"{FF}.hada_w1_b": w1b, f"{FF}.hada_w2_a": w2a, f"{FF}.hada_w2_b": w2b,
         f"{FF}.alpha": torch.tensor(2.0)}
    w0, w1 = merged(pipe, tmp_path, t, 0.7, FF)
    torch.testing.assert_close(w1, w0 + 0.7 * 0.5 * (w1a @ w1b) * (w2a @ w2b), atol=ATOL, rtol=0)
    # conv without Tucker cores: the b factors are flattened over in x kh x kw, as LyCORIS stores them
    c1a, c1b, c2a, c2b = r(64, 2, seed=12), r(2, 32 * 9, seed=13), r(64, 2, seed=14), r(2, 32 * 9, seed=15)
    t = {f"{CONV}.hada_w1_a": c1a, f"{CONV}.hada_w1_b": c1b, f"{CONV}.hada_w2_a": c2a, f"{CONV}.hada_w2_b": c2b}
    w0, w1 = merged(pipe, tmp_path, t, 1.0, CONV)
    torch.testing.assert_close(w1, w0 + ((c1a @ c1b) * (c2a @ c2b)).reshape(64, 32, 3, 3), atol=ATOL, rtol=0)


def test_loha_tucker(pipe, tmp_path):
    t1, w1a, w1b = r(2, 2, 3, 3, seed=16), r(2, 64, seed=17), r(2, 32, seed=18)
    t2, w2a, w2b = r(2, 2, 3, 3, seed=19), r(2, 64, seed=20), r(2, 32, seed=21)
    t = {f"{CONV}.hada_t1": t1, f"{CONV}.hada_w1_a": w1a, f"{CONV}.hada_w1_b": w1b, f"{CONV}.hada_t2": t2,
         f"{CONV}.hada_w2_a": w2a, f"{CONV}.hada_w2_b": w2b, f"{CONV}.alpha": torch.tensor(1.0)}
    w0, w1 = merged(pipe, tmp_path, t, 1.0, CONV)
    delta = tucker_loops(t1, w1a, w1b) * tucker_loops(t2, w2a, w2b) * 0.5
    torch.testing.assert_close(w1, w0 + delta, atol=ATOL, rtol=0)


def test_lokr_linear(pipe, tmp_path):
    # (512, 64) = (8 x 64, 4 x 16): w1 full (8, 4), w2 low rank (64, r) @ (r, 16)
    w1, w2a, w2b = r(8, 4, seed=22), r(64, 2, seed=23), r(2, 16, seed=24)
    t = {f"{FF}.lokr_w1": w1, f"{FF}.lokr_w2_a": w2a, f"{FF}.lokr_w2_b": w2b, f"{FF}.alpha": torch.tensor(1.0)}
    w0, w1m = merged(pipe, tmp_path, t, 0.9, FF)
    torch.testing.assert_close(w1m, w0 + 0.9 * 0.5 * kron(w1, w2a @ w2b), atol=ATOL, rtol=0)
    # both factors full: no rank, so the alpha does not scale (LyCORIS / A1111)
    f1, f2 = r(8, 4, seed=25), r(64, 16, seed=26)
    t = {f"{FF}.lokr_w1": f1, f"{FF}.lokr_w2": f2, f"{FF}.alpha": torch.tensor(7.0)}
    w0, w1m = merged(pipe, tmp_path, t, 1.0, FF)
    torch.testing.assert_close(w1m, w0 + kron(f1, f2), atol=ATOL, rtol=0)


def test_lokr_conv_and_tucker(pipe, tmp_path):
    # (64, 32, 3, 3) = (4 x 16, 2 x 16, 3, 3): w1 low rank, w2 a full conv kernel
    w1a, w1b, w2 = r(4, 1, seed=27), r(1, 2, seed=28), r(16, 16, 3, 3, seed=29)
    t = {f"{CONV}.lokr_w1_a": w1a, f"{CONV}.lokr_w1_b": w1b, f"{CONV}.lokr_w2": w2, f"{CONV}.alpha": torch.tensor(1.0)}
    w0, w1m = merged(pipe, tmp_path, t, 1.0, CONV)
    torch.testing.assert_close(w1m, w0 + kron(w1a @ w1b, w2), atol=ATOL, rtol=0)
    # w2 as a Tucker-2 rebuild: core (r, r, 3, 3), w2_a (r, 16 out), w2_b (r, 16 in); rank from w2_b
    w1, t2, w2a, w2b = r(4, 2, seed=30), r(2, 2, 3, 3, seed=31), r(2, 16, seed=32), r(2, 16, seed=33)
    t = {f"{CONV}.lokr_w1": w1, f"{CONV}.lokr_t2": t2, f"{CONV}.lokr_w2_a": w2a, f"{CONV}.lokr_w2_b": w2b,
         f"{CONV}.alpha": torch.tensor(4.0)}
    w0, w1m = merged(pipe, tmp_path, t, 0.5, CONV)
    torch.testing.assert_close(w1m, w0 + 0.5 * 2.0 * kron(w1, tucker_loops(t2, w2a, w2b)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_dora_scale_as_a1111_and_lycoris(pipe, tmp_path, per_row, scale):
    """D = m (W + ΔW) / ‖W + ΔW‖ (per output row for a (out, 1) magnitude, per input column for
    (1, in)), then W' = W + s (D - W)."""
    down, up = r(4, 32, 3, 3, seed=34), r(64, 4, 1, 1, seed=35)
    m = 1 + r(64, 1, 1, 1, seed=36).abs() if per_row else 1 + r(1, 32, 1, 1, seed=37).abs()
    t = {f"{CONV}.lora_down.weight": down, f"{CONV}.lora_up.weight": up, f"{CONV}.alpha": torch.tensor(2.0),
         f"{CONV}.dora_scale": m}
    w0, w1 = merged(pipe, tmp_path, t, scale, CONV)
    v = w0 + 0.5 * torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
    if per_row:
        norm = torch.sqrt((v ** 2).sum(dim=(1, 2, 3), keepdim=True))
    else:
        norm = torch.sqrt((v ** 2).sum(dim=(0, 2, 3), keepdim=True))
    torch.testing.assert_close(w1, w0 + scale * (m * v / norm - w0), atol=ATOL, rtol=0)


def test_peft_dora_matches_diffusers(sd1_folder, tmp_path):
    """PEFT's DoRA (lora_magnitude_vector): W' = m (W + s ΔW) / ‖W + s ΔW‖ per output row, as diffusers
    fuses it."""
    pytest.importorskip("peft")
    import diffusers
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from test_lora_keys import save_peft
    from test_lora_parity import _fused_weights

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                     target_modules=["to_q", "to_k", "proj_in", "conv1"])
    unet.add_adapter(cfg)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_magnitude_vector" in name:  # trained magnitudes differ from the initial norms
                p.mul_(1 + 0.2 * torch.rand_like(p))
    path = save_peft(tmp_path / "dora.safetensors", get_peft_model_state_dict(unet), {}, cfg)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None,
                                                           requires_safety_checker=False)
    ref.load_lora_weights(path.parent, weight_name=path.name)
    ref.fuse_lora(lora_scale=0.6)
    ours = Pipeline.from_pretrained(sd1_folder)
    before = weights(ours.model)
    ours.load_lora(path, 0.6)
    assert ours.loras[0]["kinds"] == ["lora+dora"]
    after, theirs = weights(ours.model), _fused_weights(ref, ours.model)
    changed = [k for k in theirs if k in after and not torch.equal(after[k], before[k])]
    assert len(changed) >= 10
    assert max((after[k] - theirs[k]).abs().max().item() for k in theirs if k in after) <= 1e-6


def test_a_4_channel_lora_on_an_inpainting_unet_leaves_the_extra_channels(inpaint_folder, tmp_path):
    """conv_in of a 9-channel inpainting UNet: the update covers the 4 latent channels (as A1111 pads it)."""
    p = Pipeline.from_pretrained(inpaint_folder)
    down, up = r(2, 4, 3, 3, seed=40), r(32, 2, 1, 1, seed=41)
    w0 = p.model.unet.input_blocks[0][0].weight.detach().clone()
    p.load_lora(save_tensors(tmp_path / "in.safetensors", {"lora_unet_conv_in.lora_down.weight": down,
                                                            "lora_unet_conv_in.lora_up.weight": up}), 1.0)
    w1 = p.model.unet.input_blocks[0][0].weight
    torch.testing.assert_close(w1[:, :4], w0[:, :4] + torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down),
                               atol=ATOL, rtol=0)
    assert torch.equal(w1[:, 4:], w0[:, 4:])
