"""Checkpoint files: every load is torch.load(weights_only=True); what is wrong with a
file, in one line (used by loading.py and released.py)."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
SHARED_CONFIG_DIR = MODEL_CONFIG_DIR / "shared"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint that cannot be used: missing parts, truncated, of another model, or
    refused (pickled code). A RuntimeError (as torch's) and a ValueError (bad input)."""


LOAD_ERRORS = (RuntimeError, KeyError, EOFError, OSError, ValueError, pickle.UnpicklingError)


def checkpoint_problem(error: BaseException, model_name: str = "") -> str:
    """What is wrong with a checkpoint, in one line, from torch's or open_clip's error."""
    message = str(error)
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in message:
        found = (re.search(r"Unsupported global: (GLOBAL \S+?)(?: was|\s|$)", message)
                 or re.search(r"(Unsupported operand \d+)", message)
                 or re.search(r"WeightsUnpickler error: ([^\n]+)", message))
        detail = f" ({found.group(1)})" if found else ""
        return (f"refused: the file holds pickled code or objects that are not tensors{detail}; "
                f"checkpoints are loaded with torch.load(weights_only=True), which never runs it")
    if "Error(s) in loading state_dict" in message:
        return f"not a {model_name or 'matching'} checkpoint ({state_dict_mismatch(message)})"
    if ("PytorchStreamReader" in message or "invalid load key" in message
            or isinstance(error, (EOFError, OSError))):
        first = message.split(". ")[0].strip() or type(error).__name__
        return f"truncated or not a torch checkpoint ({type(error).__name__}: {first})"
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def state_dict_mismatch(message: str) -> str:
    """'N missing keys (e.g. k), M unexpected keys (e.g. k), K size mismatches (e.g. ...)'
    from torch's load_state_dict error."""
    parts = []
    for label, pattern in (("missing keys", r"Missing key\(s\) in state_dict: (.*)"),
                           ("unexpected keys", r"Unexpected key\(s\) in state_dict: (.*)")):
        found = re.search(pattern, message)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{len(keys)} {label}, e.g. {keys[0]}" if keys else label)
    sizes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                       r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)",
                       message)
    if sizes:
        key, theirs, ours = sizes[0]
        parts.append(f"{len(sizes)} size mismatches, e.g. {key}: {theirs} in the file, {ours} "
                     f"in the model")
    return "; ".join(parts) or message.splitlines()[0]


def load_checkpoint(path, map_location="cpu", what: str = "checkpoint"):
    """torch.load(path, weights_only=True); a missing file is a FileNotFoundError and any
    other failure a CheckpointError, each naming the file and what is wrong in one line."""
    import torch
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such {what} file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except LOAD_ERRORS as e:
        raise CheckpointError(f"{path} ({what}): {checkpoint_problem(e)}") from None
