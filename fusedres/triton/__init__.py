"""Triton kernels and their launchers, one file per op stem (`bn_act.py` serves bn_act and dual_bn_act)."""
import os
import warnings

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETER_WARNING = ("fusedres: TRITON_INTERPRET=1 runs the Triton kernels on the CPU in Triton's interpreter, at "
                       "debugging speed (a whole ResNet can take minutes per step); on a CUDA GPU they compile. "
                       "For fast CPU runs leave TRITON_INTERPRET unset (CPU tensors then use the plain-PyTorch "
                       "reference backend).")
_warned = [False]


def warn_interpreted() -> None:
    """Warn once per process that kernels are about to run in the Triton interpreter."""
    if not _warned[0]:
        _warned[0] = True
        warnings.warn(INTERPRETER_WARNING, UserWarning, stacklevel=3)


def device_reasons(x: torch.Tensor, interpret: bool) -> list[str]:
    """Why Triton kernels cannot run on x's device (CPU tensors need the interpreter)."""
    if x.device.type == "cpu" and not interpret:
        return ["CPU tensor and the Triton interpreter is off (set TRITON_INTERPRET=1 before importing triton to "
                "run the Triton kernels on CPU)"]
    if x.device.type not in ("cpu", "cuda"):
        return [f"device type {x.device.type!r} is not supported by the Triton kernels"]
    if x.device.type == "cpu":
        warn_interpreted()  # accepted: the caller is about to launch through the interpreter
    return []
