"""Triton kernels and their launchers, one file per op stem (`bn_act.py` serves bn_act and dual_bn_act)."""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_reasons(x: torch.Tensor, interpret: bool) -> list[str]:
    """Why Triton kernels cannot run on x's device (CPU tensors need the interpreter)."""
    if x.device.type == "cpu" and not interpret:
        return ["CPU tensor and the Triton interpreter is off (set TRITON_INTERPRET=1 before importing triton to "
                "run the Triton kernels on CPU)"]
    if x.device.type not in ("cpu", "cuda"):
        return [f"device type {x.device.type!r} is not supported by the Triton kernels"]
    return []
