"""Loading open_clip models by name and weights: open_clip tags, local checkpoints
(loaded with weights_only=True) or random init, and the harness's configs:
model_configs/*.json (tiny-vit, tiny-rn, 64 px; same-width plain CLIPs for the
pretraining comparisons) and model_configs/shared/*.json (SharedCLIP, whose towers
pretraining/sharedclip.py ties; loaded here untied, with the same outputs). Eslami & de
Melo's released checkpoints and `hf-hub:` names: released.py."""
from __future__ import annotations

import difflib
import os
from typing import Optional

import open_clip

import algorithms.backbone.released as released
from algorithms.backbone.checkpoints import (CHECKPOINT_SUFFIXES, LOAD_ERRORS,
                                             MODEL_CONFIG_DIR, SHARED_CONFIG_DIR,
                                             CheckpointError, checkpoint_problem)

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"

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
    file (loaded with weights_only=True; Eslami & de Melo's released layouts included, see
    backbone/released.py), an `hf-hub:ORG/REPO[/FILE]` name found in the Hugging Face
    cache, or None/'' for random init (tiny configs). A SharedCLIP file loads untied."""
    check_model_name(model_name)
    pretrained = pretrained or None
    if pretrained and pretrained.startswith(released.HF_HUB_PREFIX):
        pretrained = str(released.resolve_hf_hub(pretrained))
    looks_like_file = pretrained and (os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES))
    if looks_like_file and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"CLIP checkpoint not found: {pretrained}")
    if looks_like_file:
        try:
            state, prefix = released.read_state_dict(pretrained)
        except CheckpointError:  # open_clip's load below says what is wrong
            state, prefix = {}, ""
        layout = released.layout_of(state)
        if layout:  # their layouts: built without weights, then filled strictly
            model = open_clip.create_model(model_name, pretrained=None, device=device)
            released.load_released(model, state, layout, source=pretrained,
                                   model_name=model_name, prefix=prefix)
            return model.eval(), open_clip.get_tokenizer(model_name)
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


