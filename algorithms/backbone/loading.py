"""Loading open_clip models by name and weights: open_clip tags, local checkpoints
(loaded with weights_only=True) or random init, and the harness's configs:
model_configs/*.json (tiny-vit, tiny-rn, 64 px; same-width plain CLIPs for the
pretraining comparisons) and model_configs/shared/*.json (SharedCLIP, whose towers
pretraining/sharedclip.py ties; loaded here untied, with the same outputs)."""
from __future__ import annotations

import difflib
import os
import pickle
import re
from pathlib import Path
from typing import Optional

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
SHARED_CONFIG_DIR = MODEL_CONFIG_DIR / "shared"
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

_configs_registered = False


def register_model_configs() -> None:
    """Make the harness's configs (model_configs/, model_configs/shared/) known to open_clip."""
    global _configs_registered
    if not _configs_registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        open_clip.add_model_config(SHARED_CONFIG_DIR)
        _configs_registered = True



def load_clip(model_name: str = DEFAULT_MODEL, pretrained: Optional[str] = DEFAULT_PRETRAINED,
              device="cpu"):
    """Return (model, tokenizer). `pretrained` is an open_clip tag, a local checkpoint
    file (loaded with weights_only=True), or None/'' for random init (tiny configs)."""
    check_model_name(model_name)
    pretrained = pretrained or None
    looks_like_file = pretrained and (os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES))
    if looks_like_file and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"CLIP checkpoint not found: {pretrained}")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                       weights_only=True,
                                       force_quick_gelu=tag_uses_quick_gelu(model_name, pretrained))
    except LOAD_ERRORS as e:  # corrupt, truncated, refused or mismatched checkpoint
        raise CheckpointError(f"cannot load CLIP {model_name} weights from {pretrained}: "
                              f"{checkpoint_problem(e, model_name)}") from None
    model.eval()
    return model, open_clip.get_tokenizer(model_name)


def check_model_name(model_name: str) -> None:
    """A ValueError naming the known models (open_clip's and model_configs/) unless known."""
    register_model_configs()
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(str(model_name), known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown CLIP model {model_name!r}{hint}; known: {', '.join(known)} "
                         f"(open_clip's configs and {MODEL_CONFIG_DIR.name}/*.json: add a JSON "
                         f"config there for another)")


# --- checkpoint files: every load is torch.load(weights_only=True) ----------------------

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


def tag_uses_quick_gelu(model_name: str, pretrained: Optional[str]) -> bool:
    """OpenAI weights were trained with QuickGELU; open_clip's plain configs (ViT-B-16)
    use GELU, so a tag that needs QuickGELU forces it rather than run mismatched."""
    if not pretrained or os.path.isfile(pretrained):
        return False
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


def image_size_of(model_name: str) -> int:
    check_model_name(model_name)
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown CLIP model {model_name!r}")
    size = cfg["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (list, tuple)) else int(size)


