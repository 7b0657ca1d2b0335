"""SharedCLIP (Eslami & de Melo, "Mitigate the Gap", ICLR 2025): one transformer for both
modalities, as open_clip model configs. Not Han et al.'s AlignCLIP (algorithms/alignclip.py).

    from pretraining import sharedclip
    model, preprocess_train, preprocess_val = sharedclip.create_model_and_transforms(
        "tiny-sharedclip", pretrained=None)

Architecture (reference: sarahESL/AlignCLIP `align_clip/model.py`):
- shared by image and text: the residual transformer, the final LayerNorm, the projection
  (width -> embed_dim) and the logit scale;
- image only: conv patch embedding, class token, positional embedding, ln_pre; CLS pooling;
- text only: token + positional embedding, causal mask; EOT (argmax-id) pooling.

Built as an ordinary open_clip `CLIP` whose two towers have the same width, layers, heads
and mlp ratio, then tied: `visual.transformer`, `visual.ln_post` and `visual.proj` become
the very modules/Parameter of the text tower's `transformer`, `ln_final` and
`text_projection` (`tie_towers`). The forward code is open_clip's own; the text tower's
initialisation (OpenAI-style normal init of the blocks, std width^-0.5 projection, as the
reference's `init_parameters`) is the one kept, since open_clip's VisionTransformer leaves
its blocks at PyTorch's default init.

Checkpoints are plain open_clip state dicts: `state_dict()` lists a tied tensor under both
names, so a SharedCLIP checkpoint loads into an untied open_clip `CLIP` of the same config
(`open_clip.create_model_and_transforms(name, pretrained=path)`) and computes exactly the
same features. No lock-in; the untied copy just stores the shared weights twice.

Which configs are shared: open_clip's `CLIP(**cfg)` rejects unknown JSON keys (TypeError),
so the mark is where the file lives: `algorithms/backbone/model_configs/shared/*.json` are
SharedCLIP configs, `algorithms/backbone/model_configs/*.json` plain ones (same-width CLIPs
for fair comparisons). The backbone registers both folders with open_clip, so every
harness method (DomainBed, Dassl) loads a SharedCLIP checkpoint by name, untied.

Configs: `SharedCLIP-ViT-B-16` (the reference's ViT-B-16: 12 layers, width 768, 12 heads,
patch 16, embed_dim 768), `SharedCLIP-ViT-B-16-512` (embed_dim 512), `SharedCLIP-ViT-L-16`
(the reference's ViT-L-16: 16 layers, width 768, embed_dim 768), `tiny-sharedclip`
(width 64, 2 layers, 2 heads, 64 px, patch 8, context 32, embed_dim 64, for CPU tests);
plain twins `CLIP-ViT-B-16-w768`, `CLIP-ViT-B-16-512-w768`, `CLIP-ViT-L-16-w768` and
`tiny-clip-w64` with identical JSON. The harness's
`tiny-vit` cannot be matched exactly (its towers differ: vision width 96 x 4 layers, text
64 x 2), so tiny comparisons use `tiny-clip-w64`, which shares tiny-vit's text tower,
image size, patch, context length and embed_dim.

Their released checkpoints (tied and untied layouts) load through
`create_model_and_transforms` as well (pretraining/released.py).

Deviations from the reference: the reference keeps an unused `text_projection` parameter;
here there is none beyond the shared one (the importer checks its shape and drops it). `lock_image_tower` (open_clip_train
`--lock-image`) would also freeze the shared transformer.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import open_clip.factory
import torch

from algorithms.backbone import loading

CONFIG_DIR = loading.MODEL_CONFIG_DIR
SHARED_CONFIG_DIR = loading.SHARED_CONFIG_DIR

# text-tower attribute of CLIP -> the vision-tower attribute tied to it
TIED = {"transformer": "transformer", "ln_final": "ln_post", "text_projection": "proj"}

def register_model_configs() -> None:
    """Make the harness's configs (plain and shared) known to open_clip; idempotent."""
    loading.register_model_configs()


def shared_model_names() -> list[str]:
    return sorted(p.stem for p in SHARED_CONFIG_DIR.glob("*.json"))


def is_shared(model_name: str) -> bool:
    return model_name in shared_model_names()


def tie_towers(model: open_clip.CLIP) -> open_clip.CLIP:
    """Make the vision tower use the text tower's transformer, final LayerNorm and
    projection (the same objects). Raises ValueError if the two are not the same shape."""
    if not isinstance(model, open_clip.CLIP) or not hasattr(model.visual, "ln_post"):
        raise ValueError(f"SharedCLIP needs an open_clip CLIP with a ViT image tower, "
                         f"got {type(model).__name__} / {type(model.visual).__name__}")
    for text_name, vis_name in TIED.items():
        text_part, vis_part = getattr(model, text_name), getattr(model.visual, vis_name)
        same = (type(text_part) is type(vis_part) and _structure(text_part) == _structure(vis_part))
        if not same:
            raise ValueError(f"cannot share {text_name} with visual.{vis_name}: the towers "
                             f"differ (give both the same width, layers, heads, mlp_ratio)")
    if getattr(model.visual, "attn_pool", None) is not None or model.visual.final_ln_after_pool:
        raise ValueError("SharedCLIP needs the plain ViT pooling (no attentional pool, "
                         "ln_post before pooling, like the text tower's ln_final)")
    model.visual.transformer = model.transformer
    model.visual.ln_post = model.ln_final
    model.visual.proj = model.text_projection
    return model


def _structure(part):
    """Layer types and hyperparameters (repr) plus every tensor's shape."""
    if isinstance(part, torch.Tensor):
        return tuple(part.shape)
    return repr(part), [tuple(t.shape) for t in part.state_dict().values()]


def is_tied(model) -> bool:
    return all(getattr(model, t) is getattr(model.visual, v) for t, v in TIED.items())


def check_shared_state_dict(state_dict: dict, source="checkpoint") -> None:
    """Raise ValueError unless every tied pair in a state dict holds equal values (a
    checkpoint of an untied model would otherwise load with one side silently dropped)."""
    for text_name, vis_name in TIED.items():
        for key, value in state_dict.items():
            if key == text_name or key.startswith(text_name + "."):
                other = "visual." + vis_name + key[len(text_name):]
                if other in state_dict and not torch.equal(value, state_dict[other]):
                    raise ValueError(f"{source} is not a SharedCLIP checkpoint: {key} and "
                                     f"{other} differ")


def create_model_and_transforms(model_name: str, pretrained: str | None = None, **kwargs):
    """open_clip.create_model_and_transforms with this folder's configs registered; for a
    shared config the towers are tied before the checkpoint (a local file) is loaded.
    `pretrained` may also be an `hf-hub:` name in the Hugging Face cache or a file in
    Eslami & de Melo's released layouts (pretraining/released.py)."""
    from pretraining import released
    register_model_configs()
    pretrained = released.local_checkpoint(pretrained)
    layout, state, prefix = released.detect(pretrained)
    if layout:
        return released.build(model_name, pretrained, layout, state, prefix, **kwargs)
    if not is_shared(model_name):
        return open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        model_name, pretrained=None, **kwargs)
    tie_towers(model)
    if pretrained:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"{model_name}: no checkpoint file {pretrained} (SharedCLIP "
                                    f"has no released open_clip tags)")
        check_shared_state_dict(open_clip.factory.load_state_dict(pretrained), pretrained)
        device = next(model.parameters()).device
        open_clip.load_checkpoint(model, pretrained, device=device)
    return model, preprocess_train, preprocess_val


def num_parameters(model) -> int:
    """Distinct parameters (a tied tensor counts once)."""
    return sum(p.numel() for p in model.parameters())
