"""Run CoOp's own train.py, unchanged, with the harness's trainers and config nodes.

CoOp's top-level `datasets`, `trainers` and `clip` packages are resolved from
third_party/CoOp: the harness's `trainers` package is registered first, then taken out
of sys.modules so that CoOp's `import trainers.coop` finds CoOp's.

For every trainer, CoOp's own (CoOp, CoCoOp, ZeroshotCLIP) included, each test writes
`<OUTPUT_DIR>/results.json` (the harness's trainers write it themselves, with what
their selection hooks chose). CoOp's trainers load OpenAI CLIP through CoOp's vendored
`clip` package, which downloads it; with CLIPBENCH_OPENAI_CLIP_DIR set they load
`<dir>/<file name of the download>` (ViT-B-16.pt, RN50.pt, ...) instead.
"""
from __future__ import annotations

import logging
import os
import pickle
import runpy
import sys
from pathlib import Path

from common import cli, env

COOP_DIR = env.coop_dir()
CLASHING_PACKAGES = ("trainers", "datasets", "clip")
OPENAI_CLIP_DIR_ENV = env.OPENAI_CLIP_DIR


class SetupError(RuntimeError):
    pass


def prepare() -> Path:
    """Register the harness with Dassl and make CoOp importable; returns CoOp's train.py."""
    train_py = COOP_DIR / "train.py"
    if not train_py.is_file():
        raise SetupError(f"CoOp not found at {COOP_DIR} (run: python third_party/install.py)")
    try:
        import dassl.config
        import dassl.data  # noqa: F401  (its WILDS import disables logging warnings)
    except ImportError as e:
        raise SetupError(f"Dassl is not installed ({e}); run: python third_party/install.py")
    logging.disable(logging.NOTSET)

    from trainers import dassl_adapter
    dassl_adapter.register_trainers()
    dassl_adapter.name_unreadable_files()
    from clipworld import dassl_dataset
    dassl_dataset.register()
    write_results_for_every_trainer(dassl_adapter.CLIPMethodTrainer)
    fix_warmup_schedulers()
    atomic_checkpoints()
    upstream_defaults = dassl.config.get_cfg_default

    def get_cfg_default():
        cfg = upstream_defaults()
        dassl_adapter.add_method_configs(cfg)
        return cfg

    dassl.config.get_cfg_default = get_cfg_default

    for name in list(sys.modules):
        if name.split(".")[0] in CLASHING_PACKAGES:
            del sys.modules[name]
    sys.path.insert(0, str(COOP_DIR))
    dassl_adapter.refuse_pickled_code_in_coop_caches()
    if os.environ.get(OPENAI_CLIP_DIR_ENV):
        use_local_openai_clip(os.environ[OPENAI_CLIP_DIR_ENV])
    return train_py


def write_results_for_every_trainer(harness_trainer_cls) -> None:
    """Wrap Dassl's SimpleTrainer.test so that trainers other than the harness's (CoOp's
    CoOp, CoCoOp, ZeroshotCLIP, ...) also write `<OUTPUT_DIR>/results.json` after a test:
    the evaluator's metrics, not a log line to scrape. Printing is unchanged."""
    from dassl.engine.trainer import SimpleTrainer
    from trainers.dassl_adapter import test_and_write_record

    upstream_test = getattr(SimpleTrainer.test, "__wrapped__", SimpleTrainer.test)

    def test(self, split=None):
        if isinstance(self, harness_trainer_cls):  # writes its own record
            return upstream_test(self, split)
        return test_and_write_record(self, lambda: upstream_test(self, split), split)

    test.__wrapped__ = upstream_test
    SimpleTrainer.test = test


def fix_warmup_schedulers() -> None:
    """Dassl's warm-up schedulers (every CoOp/CoCoOp config warms up for one epoch):
    - their __init__ calls torch's LRScheduler.__init__(optimizer, last_epoch, verbose);
      newer torch (2.14 here) has no `verbose` and raises a TypeError: same
      construction without it;
    - their state_dict pickles the successor scheduler object, optimizer included, into
      every checkpoint, which torch.load's default weights_only=True (torch >= 2.6)
      refuses: the successor is saved as its own state_dict and restored into it."""
    import inspect

    from dassl.optim import lr_scheduler
    from torch.optim.lr_scheduler import LRScheduler
    base = lr_scheduler._BaseWarmupScheduler
    if "verbose" not in inspect.signature(LRScheduler.__init__).parameters:
        def __init__(self, optimizer, successor, warmup_epoch, last_epoch=-1, verbose=False):
            self.successor = successor
            self.warmup_epoch = warmup_epoch
            super(base, self).__init__(optimizer, last_epoch)

        base.__init__ = __init__

    def state_dict(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "successor")}
        state["successor"] = self.successor.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        successor = state.pop("successor", None)
        self.__dict__.update(state)
        if isinstance(successor, dict):
            self.successor.load_state_dict(successor)

    base.state_dict, base.load_state_dict = state_dict, load_state_dict


def atomic_checkpoints() -> None:
    """Dassl's save_checkpoint writes model.pth.tar-<epoch>, the `checkpoint` file naming
    it (what Dassl resumes from) and model-best.pth.tar in place: a run killed while
    saving leaves half a checkpoint that a resume or --load-epoch would then read. Here
    each is written to a temporary name beside it and renamed (common/files.py), the
    `checkpoint` file last; what is printed is unchanged."""
    import shutil
    from collections import OrderedDict

    import torch
    from dassl.engine import trainer as dassl_trainer
    from dassl.utils import torchtools

    from common.files import atomic_path, write_atomic, write_text_atomic

    def save_checkpoint(state, save_dir, is_best=False, remove_module_from_keys=True,
                        model_name=""):
        os.makedirs(save_dir, exist_ok=True)
        if remove_module_from_keys:
            state["state_dict"] = OrderedDict((k[7:] if k.startswith("module.") else k, v)
                                              for k, v in state["state_dict"].items())
        fpath = os.path.join(save_dir, model_name or f"model.pth.tar-{state['epoch']}")
        with atomic_path(fpath) as tmp:
            torch.save(state, tmp)
        print(f"Checkpoint saved to {fpath}")
        if is_best:
            best = os.path.join(os.path.dirname(fpath), "model-best.pth.tar")
            write_atomic(best, lambda tmp: shutil.copyfile(fpath, tmp))
            print(f'Best checkpoint saved to "{best}"')
        write_text_atomic(os.path.join(save_dir, "checkpoint"), f"{os.path.basename(fpath)}\n")

    save_checkpoint.__wrapped__ = getattr(torchtools.save_checkpoint, "__wrapped__",
                                          torchtools.save_checkpoint)
    torchtools.save_checkpoint = dassl_trainer.save_checkpoint = save_checkpoint


def use_local_openai_clip(directory) -> None:
    """Make CoOp's `clip._download(url)` return `<directory>/<basename of url>` (the name
    OpenAI's download has: ViT-B-16.pt, RN50.pt, ...) instead of downloading to
    ~/.cache/clip. No SHA-256 check (so any file of that architecture can stand in);
    a missing file is an error naming the path, never a download."""
    from clip import clip as coop_clip  # CoOp's vendored package (COOP_DIR is first)

    def local_file(url, root=None):
        path = os.path.join(os.path.expanduser(directory), os.path.basename(url))
        if not os.path.isfile(path):
            names = {os.path.basename(u): name for name, u in coop_clip._MODELS.items()}
            raise FileNotFoundError(
                f"no OpenAI CLIP {names.get(os.path.basename(url), '')} weights at {path} "
                f"({OPENAI_CLIP_DIR_ENV}={directory})")
        print(f"Loading OpenAI CLIP weights from {path} ({OPENAI_CLIP_DIR_ENV})")
        return path

    coop_clip._download = local_file


def fix_seed_zero(argv):
    """CoOp's train.py ignores `--seed 0` (`if args.seed:`): pass it as a yacs opt too."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "--seed" and argv[i + 1].strip() == "0":
            return list(argv) + ["SEED", "0"]
        if arg == "--seed=0":
            return list(argv) + ["SEED", "0"]
    return list(argv)


def main(argv) -> int:
    try:
        train_py = prepare()
    except SetupError as e:
        print(f"train_coop.py: error: {e}", file=sys.stderr)
        return 2
    sys.argv = [str(train_py)] + fix_seed_zero(argv)
    try:
        runpy.run_path(str(train_py), run_name="__main__")
    except (FileNotFoundError, KeyError, ValueError, AssertionError, OSError,
            pickle.UnpicklingError, FloatingPointError) as e:
        if env.flag(env.TRACEBACK):
            raise
        where = cli.one_line(e)
        print(f"train_coop.py: error: {where} ({env.TRACEBACK}=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return 0
