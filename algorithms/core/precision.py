"""Numerical precision of a method's encoder forwards (the `precision` hyperparameter:
auto | bf16 | fp16 | fp32): which one runs where, autocast at it, and fp32 back out.
The policy: algorithms/core/method.py's docstring."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from algorithms.core.hparams import PRECISIONS

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def device_problem(device, precision: Optional[str]) -> Optional[str]:
    """Why `--device D --precision P` cannot run here (no such device, no bf16 there), in
    one line; None when it can."""
    from common.cli import one_line
    try:
        torch.empty(0, device=device)
        choose_precision(precision, device)
    except (RuntimeError, ValueError, AssertionError) as e:
        return f"--device {device} --precision {precision}: {one_line(e)}"
    return None


def choose_precision(requested: Optional[str], device) -> str:
    """The precision a method runs at on `device`: bf16 | fp16 | fp32.
    "auto" (or None): bf16 on a CUDA device with native bf16 (Ampere and later), fp16 on
    a CUDA device without it (with gradient scaling, see `scales_gradients`), fp32 on
    any other device. An explicit bf16 on a CUDA device without native bf16 is an error."""
    requested = str(requested or "auto").lower()
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} not in {PRECISIONS}")
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32" if requested == "auto" else requested
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        return "bf16" if native_bf16 else "fp16"
    if requested == "bf16" and not native_bf16:
        raise ValueError("precision bf16: this CUDA device has no native bf16; "
                         "use fp16 or auto")
    return requested


def scales_gradients(precision_name: str) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
    return precision_name == "fp16"


def autocast(precision_name: str, device_type: str):
    """torch.autocast at `precision_name`; fp32: autocast off (also inside an outer one)."""
    if precision_name == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision_name])


def as_fp32(value):
    """bf16/fp16 tensors in `value` (a tensor, tuple, list, dict or dataclass of them) as
    float32; float32 tensors are returned as they are (no copy)."""
    if torch.is_tensor(value):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(as_fp32(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(as_fp32(v) for v in value)
    if isinstance(value, dict):
        return {k: as_fp32(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: as_fp32(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


