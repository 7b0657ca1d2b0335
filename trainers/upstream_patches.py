"""The patch table for Dassl, yacs, CoOp and CoOp's vendored `clip`: for each upstream
module the harness changes, the functions applied to it, in table order, by `apply(root)`
(trainers/coop_runner.prepare calls it; calling it again changes nothing).
`COMMAND_LINE` holds the one change to CoOp's train.py, made to its arguments.
Each change and its reason: third_party/README.md. No upstream file is edited.

`open_upstream(root)` makes a Dassl-based upstream's top-level packages importable beside
the harness's own: its root goes on sys.path (for `datasets`, `clip`) and its
`trainers/` directory joins the harness's `trainers` package path, so its
`import trainers.coop` finds upstream's file and nothing is removed from sys.modules.
"""
from __future__ import annotations

import importlib
import logging
import os
import pickle
import sys
from pathlib import Path

from common import cli, env

OPENAI_CLIP_DIR_ENV = env.OPENAI_CLIP_DIR
TOP_LEVEL = ("datasets", "clip")  # upstream's own top-level packages, besides `trainers`


class UpstreamClash(RuntimeError):
    pass


_opened: list = []  # the upstream root opened in this process (at most one)


def open_upstream(root) -> None:
    """Make `root`'s `trainers.<x>`, `datasets` and `clip` importable (idempotent).
    Refuses (one line) a second upstream in the same process (CoOp, MaPLe's and
    PromptSRC's checkouts each have their own `trainers.coop`, `datasets`, `clip`), an
    upstream trainer file named like one of the harness's, and a `datasets`/`clip`
    already imported from elsewhere."""
    import trainers
    root = Path(root).resolve()
    if _opened and _opened[0] != root:
        raise UpstreamClash(f"{_opened[0].name} is already open in this process; {root.name} "
                            f"has its own `trainers`, `datasets` and `clip` (run it in its own "
                            f"process)")
    upstream_trainers = root / "trainers"
    ours = {p.name for d in trainers.__path__ if Path(d).resolve() != upstream_trainers
            for p in Path(d).glob("*.py") if p.name != "__init__.py"}
    clashes = sorted(ours & {p.name for p in upstream_trainers.glob("*.py")})
    if clashes:
        raise UpstreamClash(f"{upstream_trainers}: {', '.join(clashes)} also in the "
                            f"harness's trainers/: rename one")
    for name in TOP_LEVEL:
        loaded = sys.modules.get(name)
        where = getattr(loaded, "__file__", None) or ""
        if loaded is not None and not Path(where).resolve().is_relative_to(root):
            raise UpstreamClash(f"`{name}` is already imported from {where or 'elsewhere'}; "
                                f"{root.name} needs its own `{name}` (run it in its own process)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if str(upstream_trainers) not in trainers.__path__:
        trainers.__path__.append(str(upstream_trainers))
    _opened[:] = [root]


# --- yacs ---------------------------------------------------------------------------

def _name_malformed_config_files(yacs_config):
    """CfgNode.merge_from_file: a malformed YAML or a bad key names the file (PyYAML
    says '<unicode string>', yacs names no file)."""
    upstream = getattr(yacs_config.CfgNode.merge_from_file, "__wrapped__",
                       yacs_config.CfgNode.merge_from_file)

    def merge_from_file(self, cfg_filename):
        import yaml
        try:
            return upstream(self, cfg_filename)
        except yaml.YAMLError as e:
            raise cli.InputError(f"{cfg_filename}: malformed YAML ({cli.yaml_problem(e)})") from None
        except (KeyError, ValueError) as e:  # yacs: 'Non-existent config key: X', 'Type mismatch'
            message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
            raise type(e)(f"{cfg_filename}: {message}") from None

    merge_from_file.__wrapped__ = upstream
    yacs_config.CfgNode.merge_from_file = merge_from_file


# --- Dassl --------------------------------------------------------------------------

def _declare_harness_config_nodes(dassl_config):
    """get_cfg_default: Dassl's defaults plus cfg.CLIP and cfg.TRAINER.<NAME> for every
    harness method (trainers/dassl_adapter.add_method_configs), before any YAML merge."""
    upstream = getattr(dassl_config.get_cfg_default, "__wrapped__", dassl_config.get_cfg_default)

    def get_cfg_default():
        from trainers import dassl_adapter
        cfg = upstream()
        dassl_adapter.add_method_configs(cfg)
        return cfg

    get_cfg_default.__wrapped__ = upstream
    dassl_config.get_cfg_default = get_cfg_default


def _restore_logging(dassl_data):
    """Importing dassl.data imports WILDS, which calls logging.disable(WARNING): undone."""
    logging.disable(logging.NOTSET)


def _name_unreadable_images(data_manager):
    """read_image (Dassl's loaders): an unreadable image names the file and why (PIL
    says e.g. 'image file is truncated')."""
    upstream = getattr(data_manager.read_image, "__wrapped__", data_manager.read_image)

    def read_image(path):
        try:
            return upstream(path)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read image {path}: {cli.image_problem(path, e)}") from None

    read_image.__wrapped__ = upstream
    data_manager.read_image = read_image


def _name_malformed_json(dassl_utils):
    """read_json (CoOp's split files): malformed JSON names the file (json says only
    'Expecting value: line 1 column 1')."""
    upstream = getattr(dassl_utils.read_json, "__wrapped__", dassl_utils.read_json)

    def read_json(path):
        try:
            return upstream(path)
        except ValueError as e:
            raise ValueError(f"{path}: malformed JSON ({e})") from None

    read_json.__wrapped__ = upstream
    dassl_utils.read_json = dassl_utils.tools.read_json = read_json


def _write_results_for_every_trainer(dassl_trainer):
    """SimpleTrainer.test: trainers other than the harness's (CoOp's CoOp, CoCoOp,
    ZeroshotCLIP, ...) also write `<OUTPUT_DIR>/results.json` after a test: the
    evaluator's metrics, not a log line to scrape. Printing is unchanged."""
    from trainers.dassl_adapter import CLIPMethodTrainer, test_and_write_record
    simple = dassl_trainer.SimpleTrainer
    upstream = getattr(simple.test, "__wrapped__", simple.test)

    def test(self, split=None):
        if isinstance(self, CLIPMethodTrainer):  # writes its own record
            return upstream(self, split)
        return test_and_write_record(self, lambda: upstream(self, split), split)

    test.__wrapped__ = upstream
    simple.test = test


def _atomic_checkpoints(dassl_trainer):
    """save_checkpoint writes model.pth.tar-<epoch>, the `checkpoint` file naming it
    (what Dassl resumes from) and model-best.pth.tar in place: a run killed while saving
    leaves half a checkpoint. Each is written to a temporary name and renamed
    (common/files.py), the `checkpoint` file last; what is printed is unchanged."""
    import shutil
    from collections import OrderedDict

    import torch
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


def _fix_warmup_schedulers(lr_scheduler):
    """_BaseWarmupScheduler (every CoOp/CoCoOp config warms up for one epoch):
    - its __init__ passes `verbose` to torch's LRScheduler.__init__, which newer torch
      does not take (TypeError): same construction without it;
    - its state_dict pickles the successor scheduler, optimizer included, into every
      checkpoint, which torch.load(weights_only=True) refuses: the successor is saved
      as its own state_dict and restored into it."""
    import inspect

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


# --- CoOp ---------------------------------------------------------------------------

class _DatumUnpickler(pickle.Unpickler):
    """Rebuilds lists of Dassl Datum (what CoOp's cache files hold) and nothing else."""
    ALLOWED = {("dassl.data.datasets.base_dataset", "Datum"), ("copyreg", "__newobj__"),
               ("copyreg", "_reconstructor"), ("builtins", "object")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{getattr(self, 'path', 'a CoOp cache file')}: refused: it holds pickled code or "
            f"objects other than Dassl's Datum (GLOBAL {module}.{name}); CoOp's few-shot and "
            f"preprocessed caches are read with an unpickler that never runs it (delete the "
            f"file to have it rebuilt)")


def _load_datums(file):
    unpickler = _DatumUnpickler(file)
    unpickler.path = getattr(file, "name", "a CoOp cache file")
    return unpickler.load()


def _refuse_pickled_code_in_caches(coop_datasets):
    """CoOp's datasets read their few-shot splits (split_fewshot/shot_N-seed_S.pkl) and
    ImageNet's preprocessed.pkl with pickle.load, which runs any code such a file
    carries: in each of CoOp's dataset modules `pickle.load` only rebuilds Datum lists."""
    import pkgutil
    import types
    safe = types.SimpleNamespace(load=_load_datums, dump=pickle.dump,
                                 HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL)
    for info in pkgutil.iter_modules(coop_datasets.__path__):
        module = importlib.import_module(f"{coop_datasets.__name__}.{info.name}")
        if getattr(module, "pickle", None) is pickle:
            module.pickle = safe


def _use_local_openai_clip(coop_clip):
    """clip._download(url): with CLIPBENCH_OPENAI_CLIP_DIR=DIR set (read at each call),
    returns `DIR/<basename of url>` (ViT-B-16.pt, RN50.pt, ...) instead of downloading
    to ~/.cache/clip. No SHA-256 check; a missing file is an error naming the path."""
    upstream = getattr(coop_clip._download, "__wrapped__", coop_clip._download)

    def download(url, *args, **kwargs):
        directory = os.environ.get(OPENAI_CLIP_DIR_ENV)
        if not directory:
            return upstream(url, *args, **kwargs)
        path = os.path.join(os.path.expanduser(directory), os.path.basename(url))
        if not os.path.isfile(path):
            names = {os.path.basename(u): name for name, u in coop_clip._MODELS.items()}
            raise FileNotFoundError(
                f"no OpenAI CLIP {names.get(os.path.basename(url), '')} weights at {path} "
                f"({OPENAI_CLIP_DIR_ENV}={directory})")
        print(f"Loading OpenAI CLIP weights from {path} ({OPENAI_CLIP_DIR_ENV})")
        return path

    download.__wrapped__ = upstream
    coop_clip._download = download


# --- PromptSRC ----------------------------------------------------------------------

def _no_cuda_calls_without_cuda(promptsrc):
    """PromptSRC's trainer moves its frozen CLIP and the features it compares with
    unconditional `.cuda()` calls, which fail on a machine without CUDA (Dassl itself
    runs there on the CPU): where CUDA is unavailable, `Tensor.cuda()` and
    `Module.cuda()` return the tensor or module unchanged, in PromptSRC's process only.
    With CUDA nothing changes."""
    import torch
    if not torch.cuda.is_available():
        torch.Tensor.cuda = torch.nn.Module.cuda = _stay_where_it_is


def _stay_where_it_is(self, *args, **kwargs):
    return self


def _pass_seed_zero(argv):
    """train.py's reset_cfg ignores `--seed 0` (`if args.seed:`): also passed as a yacs opt."""
    for i, arg in enumerate(argv):
        if arg == "--seed=0" or (arg == "--seed" and argv[i + 1:i + 2] and argv[i + 1].strip() == "0"):
            return list(argv) + ["SEED", "0"]
    return list(argv)


# Applied in this order: Dassl's and yacs' modules before CoOp's `datasets`, which
# import read_json from dassl.utils when first imported.
PATCHES = {
    "yacs.config": (_name_malformed_config_files,),
    "dassl.config": (_declare_harness_config_nodes,),
    "dassl.data": (_restore_logging,),
    "dassl.data.data_manager": (_name_unreadable_images,),
    "dassl.utils": (_name_malformed_json,),
    "dassl.engine.trainer": (_write_results_for_every_trainer, _atomic_checkpoints),
    "dassl.optim.lr_scheduler": (_fix_warmup_schedulers,),
    "datasets": (_refuse_pickled_code_in_caches,),  # CoOp's (open_upstream first)
    "clip.clip": (_use_local_openai_clip,),  # CoOp's vendored OpenAI CLIP
}
# the modules only one upstream has, by its folder under third_party/ (after PATCHES)
UPSTREAM_PATCHES = {
    "PromptSRC": {"trainers.promptsrc": (_no_cuda_calls_without_cuda,)},
}
COMMAND_LINE = (_pass_seed_zero,)  # train.py's arguments (CoOp's, MaPLe's, PromptSRC's)

_applied: set = set()


def apply(upstream_root) -> None:
    """Make the upstream at `upstream_root` (CoOp's, MaPLe's or PromptSRC's checkout)
    importable (open_upstream), then import each module of PATCHES, and of its
    UPSTREAM_PATCHES, and apply its changes, each at most once per process."""
    open_upstream(upstream_root)
    tables = {**PATCHES, **UPSTREAM_PATCHES.get(Path(upstream_root).resolve().name, {})}
    for name, changes in tables.items():
        module = importlib.import_module(name)
        for change in changes:
            if (name, change.__name__) not in _applied:
                change(module)
                _applied.add((name, change.__name__))


def coop_arguments(argv) -> list:
    for change in COMMAND_LINE:
        argv = change(argv)
    return list(argv)
