"""Prediction-type adapters: the model's output (eps, v or x0) -> (x0, eps) at noise level abar."""
from __future__ import annotations

import math

import torch


def to_x0_eps(output: torch.Tensor, x: torch.Tensor, abar: float, prediction_type: str):
    a, s = math.sqrt(abar), math.sqrt(1.0 - abar)
    if prediction_type == "eps":
        return (x - s * output) / a, output
    if prediction_type == "v":  # v = a * eps - s * x0 (Salimans & Ho 2022)
        return a * x - s * output, a * output + s * x
    if prediction_type == "x0":
        return output, (x - a * output) / s
    raise ValueError(f"unknown prediction type {prediction_type!r}; use eps, v or x0")


def to_denoised(output: torch.Tensor, x: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """x0 from a model evaluated on x / sqrt(sigma^2 + 1), with x = x0 + sigma * eps (sigma space)."""
    if prediction_type == "eps":
        return x - sigma * output
    if prediction_type == "v":
        return output * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
    if prediction_type == "x0":
        return output
    raise ValueError(f"unknown prediction type {prediction_type!r}; use eps, v or x0")
