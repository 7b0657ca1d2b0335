"""Run CoOp's own train.py, unchanged, with the harness's trainers and config nodes.

CoOp's top-level `datasets`, `trainers` and `clip` packages are resolved from
third_party/CoOp: the harness's `trainers` package is registered first, then taken out
of sys.modules so that CoOp's `import trainers.coop` finds CoOp's.
"""
from __future__ import annotations

import logging
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COOP_DIR = Path(os.environ.get("CLIPBENCH_COOP_DIR", REPO / "third_party" / "CoOp"))
CLASHING_PACKAGES = ("trainers", "datasets")


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
    return train_py


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
    except (FileNotFoundError, KeyError, ValueError, AssertionError, OSError) as e:
        if os.environ.get("CLIPBENCH_TRACEBACK"):
            raise
        where = f"{type(e).__name__}: {e}".splitlines()[0]
        print(f"train_coop.py: error: {where} (CLIPBENCH_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return 1
    return 0
