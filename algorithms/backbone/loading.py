"""Loading open_clip models by name and weights: open_clip tags, local checkpoints
(loaded with weights_only=True) or random init, and the harness's configs:
model_configs/*.json (tiny-vit, tiny-rn, 64 px; same-width plain CLIPs for the
pretraining comparisons) and model_configs/shared/*.json (SharedCLIP, whose towers
pretraining/sharedclip.py ties; loaded here untied, with the same outputs)."""
from __future__ import annotations

import os
import pickle
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
    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model {model_name!r}; see open_clip.list_models() "
                         f"or add a JSON config to {MODEL_CONFIG_DIR.name}/")
    pretrained = pretrained or None
    looks_like_file = pretrained and (os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES))
    if looks_like_file and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"CLIP checkpoint not found: {pretrained}")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                       weights_only=True,
                                       force_quick_gelu=tag_uses_quick_gelu(model_name, pretrained))
    except (RuntimeError, KeyError, EOFError, OSError, ValueError,
            pickle.UnpicklingError) as e:  # corrupt or mismatched checkpoint
        raise RuntimeError(f"cannot load CLIP {model_name} weights from {pretrained}: "
                           f"{str(e).splitlines()[0]}") from e
    model.eval()
    return model, open_clip.get_tokenizer(model_name)


def tag_uses_quick_gelu(model_name: str, pretrained: Optional[str]) -> bool:
    """OpenAI weights were trained with QuickGELU; open_clip's plain configs (ViT-B-16)
    use GELU, so a tag that needs QuickGELU forces it rather than run mismatched."""
    if not pretrained or os.path.isfile(pretrained):
        return False
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


def image_size_of(model_name: str) -> int:
    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown CLIP model {model_name!r}")
    size = cfg["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (list, tuple)) else int(size)


