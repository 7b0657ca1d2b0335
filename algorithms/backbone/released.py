"""Eslami & de Melo's released checkpoints (sarahESL/AlignCLIP), read as released, and
`hf-hub:` names resolved from the Hugging Face cache without network.

Their `main/run.py` saves `{"epoch", "name", "state_dict", "optimizer"[, "scaler"]}`
(keys `module.`-prefixed when trained with DDP); a bare state dict is read the same way.
Two layouts, told apart by their keys (`layout_of`):

- SHARED: their `align_clip/model.py` CLIP (SharedCLIP, AlignCLIP): one `transformer.*`,
  `ln_post`, `projection` [width, embed] and `logit_scale` at the top;
  `visual.{conv1, class_embedding, positional_embedding, ln_pre}`;
  `text.{token_embedding, positional_embedding, text_projection}`. Their forward:
  image = ln_post(transformer(ln_pre(patches + cls + pos)))[CLS] @ projection;
  text = ln_post(transformer(tok + pos, causal mask))[argmax id] @ projection
  (`text.text_projection` is never used; it is shape-checked and dropped).
  In open_clip terms: the text tower's `transformer`, `ln_final`, `text_projection` and
  the image tower's `transformer`, `ln_post`, `proj` are the same tensors.
- UNTIED: open_clip's CustomTextCLIP layout (their baseline CLIP and IMSep-only runs):
  `visual.*` as open_clip's VisionTransformer, the text tower under `text.`
  (`text.transformer.*`, `text.ln_final`, `text.text_projection`, ...).

`load_released` turns either into a plain open_clip `CLIP` state dict and loads it
strictly: every tensor in the file used, none missing, every shape checked; otherwise a
CheckpointError naming the first key at fault (as the file spells it) in one line.
A file in neither layout (the harness's own, open_clip_train's) is left to open_clip.

Their model names (`--model` in their scripts) -> the harness's (THEIR_MODEL_NAMES):
ViT-B-16 -> SharedCLIP-ViT-B-16 (tied) / CLIP-ViT-B-16-w768 (untied), ViT-B-16-512 ->
SharedCLIP-ViT-B-16-512 / CLIP-ViT-B-16-512-w768, ViT-L-16 -> SharedCLIP-ViT-L-16 /
CLIP-ViT-L-16-w768 (model_configs/ and model_configs/shared/, same numbers as theirs).
"""
from __future__ import annotations

import os
from pathlib import Path

import algorithms.backbone.checkpoints as checkpoints
from algorithms.backbone.checkpoints import CheckpointError

SHARED = "SharedCLIP (sarahESL/AlignCLIP align_clip/model.py)"
UNTIED = "open_clip CustomTextCLIP (untied)"

# their --model name -> (harness config for the tied layout, for the untied layout)
THEIR_MODEL_NAMES = {
    "ViT-B-16": ("SharedCLIP-ViT-B-16", "CLIP-ViT-B-16-w768"),
    "ViT-B-16-512": ("SharedCLIP-ViT-B-16-512", "CLIP-ViT-B-16-512-w768"),
    "ViT-L-16": ("SharedCLIP-ViT-L-16", "CLIP-ViT-L-16-w768"),
}

# (key or prefix in the file, the open_clip CLIP keys it fills); '' = used by nothing
_RULES = {
    SHARED: (
        ("transformer", ("transformer", "visual.transformer")),
        ("ln_post", ("ln_final", "visual.ln_post")),
        ("projection", ("text_projection", "visual.proj")),
        ("logit_scale", ("logit_scale",)),
        ("visual.conv1", ("visual.conv1",)),
        ("visual.class_embedding", ("visual.class_embedding",)),
        ("visual.positional_embedding", ("visual.positional_embedding",)),
        ("visual.ln_pre", ("visual.ln_pre",)),
        ("text.token_embedding", ("token_embedding",)),
        ("text.positional_embedding", ("positional_embedding",)),
        ("text.text_projection", ()),  # kept by their model, never used in its forward
    ),
    UNTIED: (
        ("visual", ("visual",)),
        ("logit_scale", ("logit_scale",)),
        ("text.token_embedding", ("token_embedding",)),
        ("text.positional_embedding", ("positional_embedding",)),
        ("text.transformer", ("transformer",)),
        ("text.ln_final", ("ln_final",)),
        ("text.text_projection", ("text_projection",)),
    ),
}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


# --- reading ------------------------------------------------------------------------------

def read_state_dict(path) -> tuple[dict, str]:
    """(state dict, key prefix removed) of a checkpoint file: torch.load(weights_only=True)
    (memory-mapped where the format allows) or safetensors; `{"state_dict": ...}` unwrapped;
    a `module.` prefix on every key removed. A CheckpointError in one line otherwise."""
    import torch
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            content = load_file(path)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a safetensors file ({checkpoints.checkpoint_problem(e)})") from None
    else:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (non-zip) format cannot be mapped
                raise CheckpointError(f"{path}: {checkpoints.checkpoint_problem(e)}") from None
            content = checkpoints.load_checkpoint(path)
        except checkpoints.LOAD_ERRORS as e:
            raise CheckpointError(f"{path}: {checkpoints.checkpoint_problem(e)}") from None
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not content:
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors, or "
                              f"one under 'state_dict'), got {type(content).__name__}")
    for key, value in content.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
    prefixed = [k.startswith("module.") for k in content]
    if all(prefixed):
        return {k[len("module."):]: v for k, v in content.items()}, "module."
    if any(prefixed):
        bare = next(k for k in content if not k.startswith("module."))
        raise CheckpointError(f"{path}: some keys have the DDP 'module.' prefix and some not "
                              f"(e.g. {bare})")
    return content, ""


def layout_of(state: dict) -> str | None:
    """SHARED, UNTIED, or None (another layout: the harness's, open_clip's plain CLIP)."""
    if any(_under(k, "text.transformer") for k in state):
        return UNTIED
    if "projection" in state and any(_under(k, "text.token_embedding") for k in state):
        return SHARED
    return None


def released_layout(path) -> str | None:
    """The released layout of a checkpoint file, or None; raises CheckpointError if unreadable."""
    return layout_of(read_state_dict(path)[0])


# --- converting and loading -----------------------------------------------------------------

def to_open_clip(state: dict, layout: str) -> tuple[dict, dict, list]:
    """({open_clip key: tensor}, {open_clip key: file key}, [file keys no rule takes])."""
    converted, origin, unused = {}, {}, []
    for key, tensor in state.items():
        rule = next(((src, dst) for src, dst in _RULES[layout] if _under(key, src)), None)
        if rule is None:
            unused.append(key)
            continue
        src, targets = rule
        for target in targets:
            name = target + key[len(src):]
            converted[name], origin[name] = tensor, key
    return converted, origin, unused


def file_key(target: str, layout: str) -> str:
    """The key of the file that fills an open_clip key (to name a missing one)."""
    for src, targets in _RULES[layout]:
        for dst in targets:
            if _under(target, dst):
                return src + target[len(dst):]
    return target


def released_problem(model, state: dict, layout: str, prefix: str = "") -> str | None:
    """None when `state` fills `model` exactly; else the first file key that is missing,
    unexpected or of the wrong shape, in words."""
    import torch
    expected = model.state_dict()
    converted, origin, unused = to_open_clip(state, layout)
    for name, tensor in expected.items():
        if name not in converted:
            return f"missing {prefix}{file_key(name, layout)} (shape {list(tensor.shape)})"
        if tuple(converted[name].shape) != tuple(tensor.shape):
            return (f"{prefix}{origin[name]} has shape {list(converted[name].shape)}, "
                    f"the model's is {list(tensor.shape)}")
    extra = unused + [origin[n] for n in converted if n not in expected]
    if extra:
        return f"unexpected key {prefix}{extra[0]} ({len(extra)} unused tensors)"
    if layout == SHARED and "text.text_projection" in state:
        unused_proj, proj = state["text.text_projection"], state["projection"]
        if unused_proj.shape != proj.shape:
            return (f"{prefix}text.text_projection has shape {list(unused_proj.shape)}, "
                    f"projection's is {list(proj.shape)}")
    not_float = [k for k, v in converted.items() if not torch.is_floating_point(v)]
    if not_float:
        return f"{prefix}{origin[not_float[0]]} is not a floating-point tensor"
    return None


def load_released(model, state: dict, layout: str, *, source: str, model_name: str,
                  prefix: str = ""):
    """Load a released state dict into an open_clip CLIP (tied or not) strictly; a
    CheckpointError naming the file, the model and the first key at fault otherwise."""
    problem = released_problem(model, state, layout, prefix)
    if problem:
        raise CheckpointError(f"{source}: not a {model_name} checkpoint in the {layout} layout: "
                              f"{problem}{matching_hint(state, layout, model_name)}")
    model.load_state_dict(to_open_clip(state, layout)[0], strict=True)
    return model


def architecture(state: dict, layout: str) -> dict:
    """The numbers of a config that the file's shapes fix (None where a key is absent)."""
    def blocks(prefix):
        depth = len(prefix.split(".")) + 1
        return len({k.split(".")[depth] for k in state if _under(k, prefix + ".resblocks")})

    def size(key, dim):
        return int(state[key].shape[dim]) if key in state else None

    text_tower, text_proj = (("text.transformer", "text.text_projection") if layout == UNTIED
                             else ("transformer", "projection"))
    vision_tower, vision_proj = (("visual.transformer", "visual.proj") if layout == UNTIED
                                 else (text_tower, text_proj))
    arch = {"layers": blocks(text_tower), "width": size(text_proj, 0),
            "vision_layers": blocks(vision_tower), "vision_width": size(vision_proj, 0),
            "embed_dim": size(text_proj, 1), "patch_size": size("visual.conv1.weight", -1)}
    tokens = size("visual.positional_embedding", 0)
    if tokens and arch["patch_size"]:
        arch["image_size"] = int(round((tokens - 1) ** 0.5)) * arch["patch_size"]
    return arch


def config_architecture(config: dict) -> dict:
    vision, text = config["vision_cfg"], config["text_cfg"]
    return {"layers": text.get("layers"), "width": text.get("width"),
            "vision_layers": vision.get("layers"), "vision_width": vision.get("width"),
            "embed_dim": config["embed_dim"], "patch_size": vision.get("patch_size"),
            "image_size": vision.get("image_size")}


def fitting_configs(state: dict, layout: str) -> list[str]:
    """The harness's configs (model_configs/shared/ for the tied layout, model_configs/
    for the untied one) whose numbers match the file's shapes."""
    import json
    arch = architecture(state, layout)
    folder = checkpoints.SHARED_CONFIG_DIR if layout == SHARED else checkpoints.MODEL_CONFIG_DIR
    fits = []
    for path in sorted(folder.glob("*.json")):
        config_arch = config_architecture(json.loads(path.read_text()))
        if all(config_arch.get(k) == v for k, v in arch.items() if v is not None):
            fits.append(path.stem)
    return fits


def matching_hint(state: dict, layout: str, model_name: str) -> str:
    """'; the file has layers 16, width 768, ... (fits SharedCLIP-ViT-L-16)'."""
    arch = architecture(state, layout)
    fits = [name for name in fitting_configs(state, layout) if name != model_name]
    shown = {k: v for k, v in arch.items()  # one tower's numbers are both towers' when tied
             if v is not None and not (layout == SHARED and k.startswith("vision_"))}
    described = ", ".join(f"{k} {v}" for k, v in shown.items())
    theirs = (f"; their {model_name} is the harness's {harness_model_name(model_name, layout)}"
              if model_name in THEIR_MODEL_NAMES else "")
    return f"; the file has {described}" + (f" (fits {', '.join(fits)})" if fits else "") + theirs


def harness_model_name(their_name: str, layout: str) -> str:
    """Their `--model` name as the harness's config name for a file of this layout."""
    if their_name not in THEIR_MODEL_NAMES:
        return their_name
    tied, untied = THEIR_MODEL_NAMES[their_name]
    return tied if layout == SHARED else untied


# --- hf-hub: names --------------------------------------------------------------------------

HF_HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's


def resolve_hf_hub(name: str) -> Path:
    """The local file of `hf-hub:ORG/REPO` (open_clip's weight file, or the repository's
    only checkpoint file) or `hf-hub:ORG/REPO/FILE`, from the Hugging Face cache
    (HF_HUB_CACHE / HF_HOME) only: nothing is downloaded. A CheckpointError in one line
    when it is not there."""
    folder, repo, filename = hf_hub_folder(name)
    fetch = _fetch_hint(repo, filename)
    if filename:
        if not (folder / filename).is_file():
            raise CheckpointError(f"{name}: no {filename} in the cached {repo} "
                                  f"({folder}); {fetch}")
        return folder / filename
    for weights in WEIGHT_FILES:
        if (folder / weights).is_file():
            return folder / weights
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and p.name.endswith(checkpoints.CHECKPOINT_SUFFIXES))
    if len(found) != 1:
        listed = ", ".join(found) if found else "no checkpoint files"
        raise CheckpointError(f"{name}: name one file as {HF_HUB_PREFIX}{repo}/FILE (the cached "
                              f"{repo} holds {listed})")
    return folder / found[0]


def weights_file(pretrained: str) -> str:
    """The local file a `pretrained` value names (`hf-hub:` resolved from the cache), for
    the records' weights digest; other values unchanged."""
    if pretrained and pretrained.startswith(HF_HUB_PREFIX):
        return str(resolve_hf_hub(pretrained))
    return pretrained


def hf_hub_folder(name: str) -> tuple[Path, str, str]:
    """(cached snapshot folder, ORG/REPO, FILE or '') of an `hf-hub:` name, from the cache
    only; a CheckpointError in one line when the repository is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    parts = name[len(HF_HUB_PREFIX):].strip("/").split("/")
    if not name.startswith(HF_HUB_PREFIX) or len(parts) < 2 or not all(parts):
        raise CheckpointError(f"{name}: expected hf-hub:ORG/REPO or hf-hub:ORG/REPO/FILE")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        folder = Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        raise CheckpointError(f"{name}: {repo} is not in the Hugging Face cache "
                              f"({_hub_cache()}); nothing is downloaded here: "
                              f"{_fetch_hint(repo, filename)}") from None
    return folder, repo, filename


def _fetch_hint(repo: str, filename: str) -> str:
    return (f"fetch it once with `hf download {repo}{' ' + filename if filename else ''}` "
            f"(or huggingface-cli download), then rerun")


def _hub_cache() -> str:
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)
