"""The ControlNet entries of A1111's generation parameters ("infotext"), as the sd-webui-controlnet
extension writes them:  ControlNet 0: "Module: canny, Model: name [hash], Weight: 1, ..."."""
from __future__ import annotations


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def controlnet_entries(nets, modules, scales, starts, ends, thresholds=None) -> dict[str, str]:
    """{"ControlNet i": "Module: ..., Model: name [hash], Weight: w, [Threshold A: lo, Threshold B: hi, ]
    Guidance Start: s, Guidance End: e"} per loaded ControlNet `nets[i]` (LoadedControlNet); `modules` the
    preprocessor names ("none", "canny"), `thresholds` the Canny (low, high) or None, per ControlNet."""
    out = {}
    for i, net in enumerate(nets):
        parts = [f"Module: {modules[i]}", f"Model: {net.name} [{net.hash}]", f"Weight: {_num(float(scales[i]))}"]
        if thresholds is not None and thresholds[i] is not None:
            parts += [f"Threshold A: {_num(thresholds[i][0])}", f"Threshold B: {_num(thresholds[i][1])}"]
        parts += [f"Guidance Start: {_num(float(starts[i]))}", f"Guidance End: {_num(float(ends[i]))}"]
        out[f"ControlNet {i}"] = ", ".join(parts)
    return out
