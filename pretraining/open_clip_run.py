"""The one entry into open_clip_train (open_clip's own trainer): `train(argv, method, ...)`
runs `open_clip_train.main.main(argv)`, with upstream's flags, log folder and checkpoints,
and with the model built by a model factory and the loss by a loss factory handed to it.
Used by the tiny CLIP (pretraining/tiny_clip.py), SharedCLIP and AlignCLIP-IMSep
(pretraining/imsep.py) and, through imsep, the comparison (pretraining/compare.py).

    model_factory(model_name, pretrained, **kwargs) -> (model, preprocess_train, preprocess_val)
        kwargs: what open_clip_train passes to open_clip's create_model_and_transforms
        (device, precision, cache_dir, force_context_length, output_dict=True, ...);
        default: pretraining.sharedclip's (the harness's configs, shared towers tied).
    loss_factory(args) -> nn.Module called as open_clip's losses are; args: the run's parsed
        open_clip_train arguments (rank, world_size, local_loss, ...); default: open_clip's.

The seam (open_clip_train/main.py imports `create_model_and_transforms` and `create_loss`
from open_clip into its own module and calls each once): for the duration of the call, in
one try/finally that restores them, these attributes are replaced:
  - open_clip_train.main.create_model_and_transforms: the model factory;
  - open_clip_train.main.create_loss: the loss factory, its loss wrapped in StopOnNonFinite
    (a non-finite loss or term stops the run at that step, before its update, naming it);
  - torch.nn.parallel.DistributedDataParallel (open_clip_train calls torch's): device ids are
    dropped for a CPU module, which torch refuses them for, so `torchrun` with
    `--device cpu --dist-backend gloo` runs (GPU runs are untouched);
  - torch.save: a file is written to a hidden temporary beside it and renamed, so a run
    killed while saving leaves no half epoch_N.pt for `--resume latest` to pick.
"""
from __future__ import annotations

import os

import torch

from algorithms.core import nonfinite


def cpu_tolerant_ddp(ddp_class):
    """DistributedDataParallel that drops device ids for a CPU module (torch rejects them)."""
    def build(module, *args, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        return ddp_class(module, *args, device_ids=device_ids, **kwargs)
    return build


def atomic_torch_save(save):
    """torch.save that writes a file path to a hidden temporary beside it, renamed when
    complete (common/files.py): a run killed while saving epoch_N.pt leaves no half
    checkpoint for `--resume latest` to pick (its glob skips hidden files)."""
    from common.files import atomic_path

    def atomic(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with atomic_path(f) as tmp:
                return save(obj, tmp, *args, **kwargs)
        return save(obj, f, *args, **kwargs)
    return atomic


class StopOnNonFinite(torch.nn.Module):
    """The run's loss; the first step whose loss (or a term of it: IMSepLoss's clip_loss,
    imsep_loss) is not finite stops the run, before its backward, with one line naming the
    method, the step and the term(s). Training steps are counted from this process's start."""

    def __init__(self, loss, method: str):
        super().__init__()
        self.loss, self.method, self.steps = loss, method, 0

    def forward(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        parts = out if isinstance(out, dict) else {"loss": out}
        bad = {k: float(v.detach().sum()) for k, v in parts.items()
               if torch.is_tensor(v) and not bool(torch.isfinite(v).all())}
        if bad:
            raise FloatingPointError(nonfinite.stop_message(
                self.method, f"step {self.steps} of this run", bad, stops="run"))
        self.steps += 1
        return out


def default_model_factory(model_name, pretrained=None, **kwargs):
    from pretraining import sharedclip
    return sharedclip.create_model_and_transforms(model_name, pretrained, **kwargs)


def default_loss_factory(args):
    import open_clip
    return open_clip.create_loss(args)


def train(argv, method: str, model_factory=default_model_factory,
          loss_factory=default_loss_factory):
    """open_clip_train.main.main(argv) with these factories (module docstring). Returns
    (exit code: 0, or 1 where open_clip_train returned an error such as an existing log
    folder; the run's parsed arguments once its loss was built, else None)."""
    from open_clip_train import main as oc_main
    from pretraining import sharedclip
    sharedclip.register_model_configs()  # --model names the harness's configs too
    seen = {}

    def create_loss(args, *_):
        seen["args"] = args
        return StopOnNonFinite(loss_factory(args), method)

    replaced = [(oc_main, "create_model_and_transforms", model_factory),
                (oc_main, "create_loss", create_loss),
                (torch.nn.parallel, "DistributedDataParallel",
                 cpu_tolerant_ddp(torch.nn.parallel.DistributedDataParallel)),
                (torch, "save", atomic_torch_save(torch.save))]
    upstream = [(owner, name, getattr(owner, name)) for owner, name, _ in replaced]
    try:
        for owner, name, value in replaced:
            setattr(owner, name, value)
        result = oc_main.main(list(argv))
    finally:
        for owner, name, value in upstream:
            setattr(owner, name, value)
    return (0 if result is None else 1), seen.get("args")
