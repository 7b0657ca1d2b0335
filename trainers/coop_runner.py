"""Run CoOp's own train.py, unchanged, with the harness's trainers and config nodes.

A trainer that only another Dassl-based upstream has (`UPSTREAM_TRAINERS`: MaPLe, IVLP
and VPT of multimodal-prompt-learning, PromptSRC) runs through that upstream's own
train.py instead (its `extend_cfg` declares its TRAINER.<NAME> node), one upstream per
process. The upstream's top-level `datasets` and `clip` packages and its
`trainers.<name>` modules are importable beside the harness's `trainers` package
(trainers/upstream_patches.py open_upstream): nothing is removed from sys.modules. Dassl, yacs, CoOp and CoOp's `clip`
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

from common import cli, env, paths
from trainers import upstream_patches

COOP_DIR = env.coop_dir()
# third_party/<folder> whose own train.py runs these trainers; every other trainer (the
# harness's, CoOp's CoOp, CoCoOp, ZeroshotCLIP) runs in CoOp's
UPSTREAM_TRAINERS = {
    "multimodal-prompt-learning": ("MaPLe", "IVLP", "VPT"),
    "PromptSRC": ("PromptSRC",),
}


class SetupError(RuntimeError):
    pass


def upstream_dir(trainer: str | None) -> Path:
    """The checkout whose train.py runs `trainer` (CoOp's unless UPSTREAM_TRAINERS says)."""
    for folder, names in UPSTREAM_TRAINERS.items():
        if trainer in names:
            return paths.THIRD_PARTY / folder
    return COOP_DIR


def trainer_argument(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--trainer="):
            return arg.split("=", 1)[1]
        if arg == "--trainer" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def prepare(trainer: str | None = None) -> Path:
    """Register the harness with Dassl, make the upstream that runs `trainer` importable
    (CoOp by default) and apply the patch table; returns that upstream's train.py.
    Calling it again changes nothing."""
    root = upstream_dir(trainer)
    train_py = root / "train.py"
    if not train_py.is_file():
        raise SetupError(f"{root.name} not found at {root} (run: python third_party/install.py)")
    try:
        import dassl.config  # noqa: F401
        import dassl.data  # noqa: F401
    except ImportError as e:
        raise SetupError(f"Dassl is not installed ({e}); run: python third_party/install.py")

    try:
        upstream_patches.apply(root)
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
        train_py = prepare(trainer_argument(argv))
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
