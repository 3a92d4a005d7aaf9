"""Prompt text -> context: A1111's prompt syntax (its own documented examples), 75-token chunks (comma
back-off, BREAK, atomic embeddings), the mean-restoring emphasis against a hand computation on the text
encoder's output, long prompts and negative padding, bit-exact contexts for plain short prompts, clip skip
against transformers' hidden states, and user-made prompt_embeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_engine import Pipeline, load_checkpoint
from ldm_engine.prompts.chunks import ChunkLayout, layout_chunks
from ldm_engine.prompts.encode import emphasize
from ldm_engine.prompts.parser import BREAK, parse_prompt, parse_prompt_attention


# ---- the parser ------------------------------------------------------------------------------------

# A1111's own doctest vectors (modules/prompt_parser.py), to the last bit of the float products
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_a1111_documented_examples(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("((word))", [("word", 1.1 * 1.1)]),
    ("(((house:1.3)))", [("house", 1.3 * 1.1 * 1.1)]),  # 1.573
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]]", [("x", 1 / 1.1 / 1.1)]),
    ("(x:1.5) y", [("x", 1.5), (" y", 1.0)]),
    ("(x:-0.5)", [("x", -0.5)]),
    ("a [b", [("a ", 1.0), ("b", 1 / 1.1)]),  # unclosed: to the end
    ("a) b] c:2)", [("a) b] c:2)", 1.0)]),  # closers that close nothing are text
    ("a\\\\b \\[c\\]", [("a\\b [c]", 1.0)]),
    ("time: 3:00", [("time: 3:00", 1.0)]),
    ("", [("", 1.0)]),
])
def test_weights_nesting_escapes_and_literals(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], rtol=1e-12)


def test_break_separates_runs_and_stays_a_break_inside_brackets():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    runs = parse_prompt_attention("(a BREAK b)")
    assert runs[1] is BREAK and runs[0] == ("a", 1.1) and runs[2] == ("b", 1.1)
    assert parse_prompt_attention("BREAKFAST") == [("BREAKFAST", 1.0)]  # a whole word only


def test_plain_syntax_and_bad_input():
    assert parse_prompt("a (b:1.5) BREAK c", "plain") == [("a (b:1.5) BREAK c", 1.0)]
    with pytest.raises(ValueError, match="prompt_syntax must be 'a1111' or 'plain'"):
        parse_prompt("x", "comfy")
    with pytest.raises(ValueError, match=r"prompt weight '1\.2\.3'.*escape the bracket"):
        parse_prompt_attention("(a:1.2.3)")


# ---- chunk layout ------------------------------------------------------------------------------------

L = ChunkLayout(bos=100, eos=101, pad=0, comma=9)


def test_chunks_pad_and_carry_weights():
    (chunk,) = layout_chunks([([5, 6], 1.0), ([7], 1.5)], L)
    assert chunk.ids == [100, 5, 6, 7, 101] + [0] * 72 and len(chunk.weights) == 77
    assert chunk.weights[:5] == [1.0, 1.0, 1.0, 1.5, 1.0] and chunk.weighted
    (empty,) = layout_chunks([([], 1.0)], L)  # the empty prompt: one chunk
    assert empty.ids == [100, 101] + [0] * 75 and not empty.weighted


def test_a_full_chunk_breaks_at_the_last_comma_within_20_tokens():
    tokens = [5] * 70 + [9] + [6] * 10  # 81 tokens, a comma at 70
    first, second = layout_chunks([(tokens, 1.0)], L)
    assert first.ids[1:72] == [5] * 70 + [9] and first.ids[72:] == [101, 0, 0, 0, 0]
    assert second.ids[1:12] == [6] * 10 + [101]  # the 4 tokens after the comma moved along
    far = [5] * 50 + [9] + [6] * 30  # the comma is 25 tokens back: no back-off
    first, second = layout_chunks([(far, 1.0)], L)
    assert first.ids[1:76] == far[:75] and second.ids[1:8] == far[75:] + [101]


def test_break_closes_the_chunk_and_embeddings_never_split():
    a, b = layout_chunks([([5, 6], 1.0), BREAK, ([7], 1.0)], L)
    assert a.ids[:4] == [100, 5, 6, 101] and b.ids[:3] == [100, 7, 101]
    first, second = layout_chunks([([5] * 73, 1.0), ([(500, 501, 502)], 1.2)], L)
    assert first.ids[74:] == [101, 0, 0]  # 73 tokens, then no room for 3 vectors
    assert second.ids[:5] == [100, 500, 501, 502, 101] and second.weights[1:4] == [1.2] * 3
    (one,) = layout_chunks([([5] * 72, 1.0), ([(500, 501, 502)], 1.0)], L)  # exactly fits
    assert one.ids[73:77] == [500, 501, 502, 101]


# ---- encoding on the tiny SD1 / SD2 folders -------------------------------------------------------------

def _with_ln_bias(folder):
    """A loaded model whose final LayerNorm has a bias: random-init CLIP has bias 0, which makes every
    token's mean 0 and the emphasis rescale (mean / mean) a ratio of rounding errors."""
    model = load_checkpoint(folder)
    with torch.no_grad():
        model.text_encoder.final_layer_norm.bias.copy_(torch.randn(32, generator=torch.Generator().manual_seed(0)))
    return model


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return Pipeline(_with_ln_bias(sd1_folder))


@pytest.fixture(scope="module")
def plain_sd1(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_unweighted_short_prompts_give_exactly_the_old_context(style, sd1_folder, sd2_folder):
    pipe = Pipeline.from_pretrained(sd1_folder if style == "sd1" else sd2_folder)
    prompts, negatives = ["a photo of a cat", "a red circle on a blue background"], ["blurry", ""]
    old = pipe.backend.encode_text(pipe.model.tokenizer(prompts + negatives))  # the tokenizer's 77 ids
    context, uncond = pipe.encode_prompt(prompts, negatives)
    assert torch.equal(context, old[:2]) and torch.equal(uncond, old[2:])


def test_emphasis_matches_a_hand_computation(sd1):
    prompt = "a (red:1.4) circle on a [blue] background"
    (chunk,) = sd1.prompts.chunks(prompt)
    z = sd1.model.text_encoder(torch.tensor([chunk.ids])).detach().double()[0]  # (77, 32)
    w = torch.tensor(chunk.weights, dtype=torch.float64)
    assert sorted(set(chunk.weights)) == pytest.approx([1 / 1.1, 1.0, 1.4])
    expected = torch.empty_like(z)
    for i in range(77):  # every token's hidden state times its weight ...
        expected[i] = z[i] * w[i]
    expected *= z.mean() / expected.mean()  # ... then the chunk's mean restored
    context, _ = sd1.encode_prompt(prompt)
    assert (context[0].double() - expected).abs().max() <= 5e-5  # float32 means against float64
    plain = sd1.encode_prompt("a red circle on a blue background")[0]
    assert (context - plain).abs().max() > 1e-2  # the weights do change the context
    # one mean per prompt and chunk: a batch holds each prompt's own
    batch, _ = sd1.encode_prompt([prompt, "x"])
    assert (batch[0] - context[0]).abs().max() <= 1e-5
    assert emphasize(z[None].float(), torch.ones(1, 77)).sub(z.float()).abs().max() <= 1e-6


def test_long_prompts_are_chunked_and_the_negative_padded(sd1):
    long = ", ".join(["a painting of a fox in the snow"] * 7)  # 104 tokens of the tiny vocabulary
    tokens = sd1.model.tokenizer.tokenize(long)
    chunks = sd1.prompts.chunks(long)
    assert 75 < len(tokens) <= 130 and len(chunks) == 2
    body = [t for c in chunks for t in c.ids[1: c.ids.index(sd1.model.tokenizer.eos_token_id)]]
    assert body == tokens  # nothing lost or reordered by the comma back-off
    assert chunks[0].ids[-1] == sd1.model.tokenizer.pad_token_id  # backed off to a comma: padded
    context, uncond = sd1.encode_prompt(long, "blurry")
    assert context.shape == uncond.shape == (1, 154, 32)
    alone = sd1.encode_prompt("blurry")[0]
    empty = sd1.encode_prompt("")[0]
    assert (uncond[:, :77] - alone).abs().max() <= 1e-5  # the negative, then an empty-prompt chunk
    assert (uncond[:, 77:] - empty).abs().max() <= 1e-5
    first = sd1.backend.encode_text(torch.tensor([chunks[0].ids]))
    assert (context[:, :77] - first).abs().max() <= 1e-5
    out = sd1(long, negative_prompt="blurry", num_inference_steps=2, height=16, width=16, seed=0, output_type="np",
              progress=False)
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


def test_break_starts_a_new_chunk(sd1):
    context, _ = sd1.encode_prompt("a red circle BREAK a blue square")
    assert context.shape == (1, 154, 32)
    assert (context[:, 77:] - sd1.encode_prompt("a blue square")[0]).abs().max() <= 1e-5
    assert (context[:, :77] - sd1.encode_prompt("a red circle")[0]).abs().max() <= 1e-5


def test_plain_syntax_reads_brackets_as_text(sd1_folder):
    pipe = Pipeline.from_pretrained(sd1_folder, prompt_syntax="plain")
    (chunk,) = pipe.prompts.chunks("a (red) circle")
    tokens = pipe.model.tokenizer.tokenize("a (red) circle")
    assert chunk.ids[1: len(tokens) + 1] == tokens and not chunk.weighted
    with pytest.raises(ValueError, match="prompt_syntax must be"):
        Pipeline.from_pretrained(sd1_folder, prompt_syntax="comfy")


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_clip_skip_is_the_hidden_state_n_back_then_the_final_layer_norm(style, sd1_folder, sd2_folder):
    from transformers import CLIPTextModel

    folder = sd1_folder if style == "sd1" else sd2_folder
    hf = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    pipe = Pipeline.from_pretrained(folder)
    prompt = "a photo of a cat"
    ids = pipe.model.tokenizer([prompt])
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
        for n in (1, 2, 3):  # the folders' encoders have 3 layers, their own output the last
            expected = hf.final_layer_norm(hidden[-n])
            assert (pipe.encode_prompt(prompt, clip_skip=n)[0] - expected).abs().max() <= 1e-5
    default = Pipeline.from_pretrained(folder, clip_skip=2)  # a pipeline-wide default, overridden per call
    assert torch.equal(default.encode_prompt(prompt)[0], pipe.encode_prompt(prompt, clip_skip=2)[0])
    assert torch.equal(default.encode_prompt(prompt, clip_skip=1)[0], pipe.encode_prompt(prompt)[0])
    with pytest.raises(ValueError, match=r"clip_skip=4 is too large.*use 1\.\.3"):
        pipe.encode_prompt(prompt, clip_skip=4)
    for bad in (0, "2", 1.5):
        with pytest.raises(ValueError, match="clip_skip must be an integer >= 1"):
            pipe.encode_prompt(prompt, clip_skip=bad)


def test_clip_skip_matches_diffusers_which_counts_one_less(plain_sd1, sd1_folder):
    """diffusers' clip_skip=k is this clip_skip=k+1 (it counts skipped layers). diffusers applies it to the
    prompt only, not the negative prompt, so the prompt embeddings are compared, not images."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None,
                                                            requires_safety_checker=False)
    # diffusers reads text_encoder.text_model.final_layer_norm, which transformers 5 moved up a level
    object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)
    for k in (1, 2):
        expected, _ = ref.encode_prompt("a red circle", "cpu", 1, False, clip_skip=k)
        got, _ = plain_sd1.encode_prompt("a red circle", clip_skip=k + 1)
        assert (got - expected).abs().max() <= 1e-5


def test_prompt_embeds_stand_in_for_prompts(sd1):
    kw = dict(num_inference_steps=2, guidance_scale=5.0, height=16, width=16, seed=4, output_type="np", progress=False)
    long = " ".join(["a red circle on a blue background"] * 12)
    context, uncond = sd1.encode_prompt(long, "blurry")
    by_text = sd1(long, negative_prompt="blurry", **kw).images
    by_embeds = sd1(prompt_embeds=context, negative_prompt_embeds=uncond, **kw).images
    np.testing.assert_array_equal(by_text, by_embeds)
    # no negative: the empty prompt, padded to the context's length
    no_negative = sd1(prompt_embeds=context, **kw).images
    np.testing.assert_allclose(no_negative, sd1(long, **kw).images, atol=1e-6)
    # a short negative_prompt_embeds is padded with empty-prompt chunks as well
    short = sd1(prompt_embeds=context, negative_prompt_embeds=sd1.encode_prompt("blurry")[0], **kw).images
    np.testing.assert_allclose(short, by_text, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_embeds=torch.zeros(1, 77, 16)), r"prompt_embeds must have shape \(batch, 77·k, 32\)"),
    (dict(prompt_embeds=torch.zeros(1, 80, 32)), r"prompt_embeds must have shape"),
    (dict(prompt_embeds=torch.zeros(77, 32)), r"prompt_embeds must have shape"),
    (dict(prompt_embeds=[[0.0]]), "must be a torch.Tensor"),
    (dict(prompt="x", prompt_embeds=torch.zeros(1, 77, 32)), "pass prompt or prompt_embeds, not both"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(2, 77, 32)),
     "negative_prompt_embeds has batch 2, the prompts 1"),
    (dict(prompt="x", negative_prompt="y", negative_prompt_embeds=torch.zeros(1, 77, 32)), "not both"),
    (dict(prompt_embeds=torch.full((1, 77, 32), float("nan"))), "NaN"),
    (dict(prompt=["a", "b"], negative_prompt=["c"]), "got 1 negative prompts for 2 prompts"),
])
def test_prompt_embeds_errors(plain_sd1, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plain_sd1(**kwargs, height=16, width=16, num_inference_steps=1, progress=False)


def test_no_prompt_arguments_for_models_without_text(tiny_sd1):
    from ldm_engine.loading import random_model

    uncond = Pipeline(random_model("tiny-ldm-vq"))
    with pytest.raises(ValueError, match="not text-conditioned"):
        uncond(clip_skip=2, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="no text encoder"):
        uncond.encode_prompt("x")
    with pytest.raises(ValueError, match="no text encoder"):
        Pipeline(random_model("tiny-ldm-vq"), clip_skip=2)
