"""The A1111 infotext (`parameters` PNG chunk): its quoting rule, a round trip, and what ldm-generate writes."""
from PIL import Image

from ldm_engine.cli import main
from ldm_engine.infotext import infotext, parse_infotext, quote


def test_quoting_follows_a1111():
    assert quote("DPM++ 2M Karras") == "DPM++ 2M Karras"
    assert quote("style: 0123, other: 4567") == '"style: 0123, other: 4567"'
    assert quote('say "hi"') == '"say \\"hi\\""'


def test_round_trip_keeps_every_field_and_multi_line_prompts():
    fields = {"Steps": 20, "Sampler": "Euler a", "CFG scale": "7.5", "Seed": 3, "Size": "512x768",
              "Lora hashes": "a: 0123456789ab, b: ba9876543210", "Clip skip": 2, "Version": "ldm_engine 0.1.0"}
    text = infotext("a cat,\n(on a mat:1.2)", "blurry, lowres", fields)
    assert text.splitlines()[2].startswith("Negative prompt: blurry")
    prompt, negative, got = parse_infotext(text)
    assert prompt == "a cat,\n(on a mat:1.2)" and negative == "blurry, lowres"
    assert got == {k: str(v) for k, v in fields.items()}


def test_ldm_generate_writes_the_a1111_form(sd1_folder, tmp_path):
    out = tmp_path / "cat.png"
    assert main(["a photo of a cat", "--model", str(sd1_folder), "--steps", "2", "--seed", "7", "--size", "16x24",
                 "--sampler", "dpmpp_2m_karras", "--guidance", "5", "--negative", "blurry", "--clip-skip", "2",
                 "-o", str(out)]) == 0
    text = Image.open(out).text
    prompt, negative, fields = parse_infotext(text["parameters"])
    assert (prompt, negative) == ("a photo of a cat", "blurry")
    assert fields["Steps"] == "2" and fields["Sampler"] == "DPM++ 2M Karras" and fields["CFG scale"] == "5"
    assert fields["Seed"] == "7" and fields["Size"] == "16x24" and fields["Clip skip"] == "2"
    assert fields["Model hash"] == text["model_hash"] and fields["Model"] == sd1_folder.name
    assert "Denoising strength" not in fields and fields["Version"].startswith("ldm_engine ")
