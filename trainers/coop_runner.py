"""Run CoOp's own train.py, unchanged, with the harness's trainers and config nodes.

CoOp's top-level `datasets` and `clip` packages and its `trainers.<name>` modules are
importable beside the harness's `trainers` package (trainers/upstream_patches.py
open_upstream): nothing is removed from sys.modules. Dassl, yacs, CoOp and CoOp's `clip`
are changed once, through the table of trainers/upstream_patches.py (each change and why:
third_party/README.md): among them, every trainer, CoOp's own (CoOp, CoCoOp,
ZeroshotCLIP) included, writes `<OUTPUT_DIR>/results.json` after each test, and with
CLIPBENCH_OPENAI_CLIP_DIR set CoOp's trainers load OpenAI CLIP from
`<dir>/<file name of the download>` (ViT-B-16.pt, RN50.pt, ...) instead of downloading it.
"""
from __future__ import annotations

import pickle
import runpy
import sys
from pathlib import Path

from common import cli, env
from trainers import upstream_patches

COOP_DIR = env.coop_dir()


class SetupError(RuntimeError):
    pass


def prepare() -> Path:
    """Register the harness with Dassl, make CoOp importable and apply the patch table;
    returns CoOp's train.py. Calling it again changes nothing."""
    train_py = COOP_DIR / "train.py"
    if not train_py.is_file():
        raise SetupError(f"CoOp not found at {COOP_DIR} (run: python third_party/install.py)")
    try:
        import dassl.config  # noqa: F401
        import dassl.data  # noqa: F401
    except ImportError as e:
        raise SetupError(f"Dassl is not installed ({e}); run: python third_party/install.py")

    try:
        upstream_patches.apply(COOP_DIR)
    except upstream_patches.UpstreamClash as e:
        raise SetupError(str(e)) from None
    from clipworld import dassl_dataset
    from trainers import dassl_adapter
    dassl_adapter.register_trainers()
    dassl_dataset.register()
    return train_py


HELP_LINE = "CoOp's train.py with the harness's trainers (docs: docs/coop.md); its own options:\n"


def main(argv) -> int:
    if {"-h", "--help"} & set(argv):
        print(HELP_LINE)
    try:
        train_py = prepare()
    except SetupError as e:
        print(f"train_coop.py: error: {e}", file=sys.stderr)
        return 2
    sys.argv = [str(train_py)] + upstream_patches.coop_arguments(argv)
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
