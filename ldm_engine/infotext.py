"""Generation parameters as AUTOMATIC1111's "infotext": the `parameters` PNG text chunk that A1111,
ComfyUI importers and civitai read back.

    a photo of a cat <lora:style:0.5>
    Negative prompt: blurry
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, Clip skip: 2, Lora hashes: "style: 0123456789ab", TI hashes: "mystyle: 0123456789ab", Version: ldm_engine 0.1.0

The prompt's lines come first, then an optional `Negative prompt:` line, then one line of `Key: value`
pairs; a value holding a comma, a colon or a newline is written as a JSON string (A1111's `quote`).
"""
from __future__ import annotations

import json
import re

# ldm_engine sampler name -> the name A1111 shows and parses (its sampler list)
A1111_SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a",
                       "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras", "lcm": "LCM", "tcd": "TCD"}


def quote(value) -> str:
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The A1111 parameters text: prompt, negative prompt, then `fields` in order (None values left out)."""
    lines = [prompt or ""]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None and v != ""))
    return "\n".join(lines)


_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) from an infotext, the inverse of `infotext` (values as text)."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(_PAIR.findall(lines[-1])) >= 3 else ""
    body = lines[:-1] if last else lines
    prompt, negative, target = [], [], None
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line[len("Negative prompt:"):].strip()
        (negative if target is negative else prompt).append(line)
    fields = {}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value
    return "\n".join(prompt), "\n".join(negative), fields
