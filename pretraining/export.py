"""Export a checkpoint as an open_clip model folder (docs: docs/pretraining.md).

Export a harness checkpoint as an open_clip model folder that any open_clip user (and
CLIP_benchmark) loads without this repository:

    python -m pretraining.export --model tiny-sharedclip --checkpoint ckpt.pt --out DIR
    # anywhere, open_clip >= 3.0 only:
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
    tokenizer = open_clip.get_tokenizer("local-dir:DIR")
    # CLIP_benchmark: clip_benchmark eval --model local-dir:DIR --pretrained none ...

The folder is open_clip's Hugging Face layout (open_clip/push_to_hf_hub.py, read by
open_clip/factory.py's `local-dir:` and `hf-hub:` schemas): `open_clip_config.json`
({"model_cfg": the config JSON, "preprocess_cfg": mean/std/interpolation/resize_mode},
written by open_clip's own `save_config_for_hf`) and `open_clip_model.safetensors`. A
SharedCLIP checkpoint is written untied (plain open_clip CLIP, the shared weights stored
twice), which computes the same features (pretraining/sharedclip.py). The top-level key
`clipbench` records the source (harness config name, checkpoint, whether shared); open_clip
ignores it. Each file is written atomically.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

from common import cli

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def export_open_clip_dir(model_name: str, checkpoint, out_dir) -> Path:
    """Write DIR/open_clip_config.json + DIR/open_clip_model.safetensors; return DIR."""
    import open_clip
    import open_clip.factory
    import safetensors.torch
    from open_clip.push_to_hf_hub import save_config_for_hf
    from common.files import atomic_path
    from pretraining import sharedclip

    sharedclip.register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown model {model_name!r}")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint file")
    shared = sharedclip.is_shared(model_name)
    if shared:
        sharedclip.check_shared_state_dict(open_clip.factory.load_state_dict(str(checkpoint)),
                                           str(checkpoint))
    try:
        model = open_clip.create_model(model_name, pretrained=str(checkpoint), weights_only=True)
    except (RuntimeError, ValueError, OSError, KeyError, EOFError, pickle.UnpicklingError) as e:
        from algorithms.backbone import checkpoint_problem
        raise ValueError(f"{checkpoint}: cannot load as {model_name} "
                         f"({checkpoint_problem(e, model_name)})") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        safetensors.torch.save_file(state, str(tmp))
    with atomic_path(out / CONFIG_NAME) as tmp:
        save_config_for_hf(model, tmp, model_config=open_clip.get_model_config(model_name))
        config = json.loads(tmp.read_text())
        config["clipbench"] = {"model": model_name, "shared": shared,
                               "checkpoint": str(Path(checkpoint).resolve())}
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretraining.export",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        print(export_open_clip_dir(a.model, a.checkpoint, a.out))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.run(main)
