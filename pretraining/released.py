"""Eslami & de Melo's released checkpoints (sarahESL/AlignCLIP) as the harness's models
(docs: docs/pretraining.md, "Loading the released checkpoints").

    python -m pretraining.released FILE|hf-hub:ORG/REPO[/FILE] [--model NAME] [--out FILE]

prints the file's layout and the harness config it fits; with --out, writes its weights
as a plain open_clip state dict (the harness's checkpoint format), atomically.

Their tied SharedCLIP / AlignCLIP file becomes the harness's tied SharedCLIP (a shared
config: SharedCLIP-ViT-B-16, -512, SharedCLIP-ViT-L-16) or, with a plain config of the
same numbers, an untied open_clip CLIP that computes the same features; their untied
baseline / IMSep-only files become a plain open_clip CLIP (CLIP-ViT-B-16-w768, ...) and
are refused by a tied config (the two towers' weights differ). The key mapping, the
strict checks and the `hf-hub:` lookup are algorithms/backbone/released.py, which the
methods' loader (`backbone.load_clip`, `clip_pretrained=`) uses as well.

`--model` takes the harness's names or theirs (`ViT-B-16` as in their scripts: mapped by
the file's layout, backbone.released.THEIR_MODEL_NAMES); without it the only fitting
harness config is used.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from algorithms.backbone import released as layouts
from algorithms.backbone.checkpoints import CheckpointError
from common import cli


def local_checkpoint(pretrained):
    """An `hf-hub:` name as its cached file; anything else unchanged."""
    if pretrained and str(pretrained).startswith(layouts.HF_HUB_PREFIX):
        return str(layouts.resolve_hf_hub(str(pretrained)))
    return pretrained


def detect(pretrained) -> tuple[str | None, dict, str]:
    """(released layout or None, state dict, key prefix) of a checkpoint file; (None, {}, '')
    for anything else (no file, an open_clip tag, an unreadable file: open_clip's loader
    then says what is wrong)."""
    if not pretrained or not Path(pretrained).is_file():
        return None, {}, ""
    try:
        state, prefix = layouts.read_state_dict(pretrained)
    except CheckpointError:
        return None, {}, ""
    layout = layouts.layout_of(state)
    return (layout, state, prefix) if layout else (None, {}, "")


def build(model_name: str, path, layout: str, state: dict, prefix: str = "", **kwargs):
    """(model, preprocess_train, preprocess_val) of `model_name` holding a released file's
    weights; tied for a shared config. CheckpointError (one line) on any mismatch."""
    import open_clip
    from pretraining import sharedclip
    sharedclip.register_model_configs()
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        model_name, pretrained=None, **kwargs)
    if sharedclip.is_shared(model_name):
        if layout == layouts.UNTIED:
            twins = layouts.fitting_configs(state, layout)
            raise CheckpointError(f"{path}: an untied checkpoint ({layout}) cannot fill the tied "
                                  f"{model_name} (its towers' weights differ); load it as "
                                  f"{' or '.join(twins) or 'a plain CLIP config of its size'}")
        sharedclip.tie_towers(model)
    layouts.load_released(model, state, layout, source=str(path), model_name=model_name,
                          prefix=prefix)
    return model, preprocess_train, preprocess_val


def import_released(checkpoint, model_name: str | None = None, **kwargs):
    """(model, preprocess_train, preprocess_val, harness model name) of a released file or
    `hf-hub:` name; `model_name` is the harness's or theirs, or None for the one that fits."""
    path = local_checkpoint(checkpoint)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    state, prefix = layouts.read_state_dict(path)
    layout = layouts.layout_of(state)
    if layout is None:
        raise CheckpointError(f"{path}: not in a released layout (neither their tied "
                              f"{layouts.SHARED} nor {layouts.UNTIED}); a harness or open_clip "
                              f"checkpoint loads by --model/--checkpoint as it is")
    name = choose_model(state, layout, model_name, path)
    model, preprocess_train, preprocess_val = build(name, path, layout, state, prefix, **kwargs)
    return model.eval(), preprocess_train, preprocess_val, name


def choose_model(state: dict, layout: str, model_name: str | None, path) -> str:
    if model_name:
        return layouts.harness_model_name(model_name, layout)
    fits = layouts.fitting_configs(state, layout)
    if len(fits) != 1:
        raise CheckpointError(f"{path}: give --model ({len(fits)} harness configs fit: "
                              f"{', '.join(fits) or 'none'}{layouts.matching_hint(state, layout, '')})")
    return fits[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretraining.released",
                                description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a released file or hf-hub:ORG/REPO[/FILE] (cache only)")
    p.add_argument("--model", default=None, help="harness config or their --model name")
    p.add_argument("--out", default=None, help="write a plain open_clip state dict here")
    a = p.parse_args(argv)
    import torch
    from common.files import atomic_path
    from pretraining import sharedclip
    model, _, _, name = import_released(a.checkpoint, a.model)
    layout = layouts.layout_of(layouts.read_state_dict(local_checkpoint(a.checkpoint))[0])
    print(f"{a.checkpoint}: {layout} -> {name} ({'tied' if sharedclip.is_tied(model) else 'untied'}, "
          f"{sharedclip.num_parameters(model):,} parameters)")
    if a.out:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with atomic_path(a.out) as tmp:
            torch.save(state, tmp)
        print(f"wrote {a.out} (load with --model {name} --checkpoint {a.out})")
    return 0


if __name__ == "__main__":
    cli.run(main)
