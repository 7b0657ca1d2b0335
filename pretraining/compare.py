"""Pretrain tiny CLIP, SharedCLIP, AlignCLIP-IMSep alike and compare them (docs: docs/pretraining.md).

CLIP vs SharedCLIP vs AlignCLIP-IMSep (Eslami & de Melo, ICLR 2025) pretrained on the
generated dataset's image-caption pairs, on CPU, with the same data, steps and seed, then
evaluated alike.

    python -m pretraining.compare --world data/world [--seeds 0 1] [--epochs N]

Each run is `python -m pretraining.imsep` (open_clip_train, entered through
pretraining/open_clip_run.py; without the IMSep flags it is plain open_clip training, so
all three go through the same trainer and the same command line apart from --model and
the loss flags; each run's facts land in its logs/train/run.json):
  CLIP             tiny-clip-w64, open_clip's ClipLoss
  SharedCLIP       tiny-sharedclip (towers tied), ClipLoss
  AlignCLIP-IMSep  tiny-sharedclip + --clip-inModality-loss --nl_semantic_supervision
                   (alpha 1, beta 0.5, both in-modality separations, negatives rescaled by
                   1 - S S^T of all-MiniLM-L6-v2 caption embeddings; pretraining/imsep.py)
Training: the world's pairs/train.csv (seen domains photo/sketch/cartoon, two captions per
image), open_clip_train's recipe of pretraining/tiny_clip.py (batch 32, lr 1e-3, warmup 30,
wd 0.1, fp32, AdamW, cosine) for --epochs (default 6: one seed, all three trained and
evaluated from a cold cache, took 5 min 18 s on this 2-core machine, unloaded). The CSV is copied into the cache (so the sentence
sidecar is written there, not into the world). Checkpoints are cached under
<cache-dir>/<key>/model.pt, key = hash of (method flags, model config, training config,
seed, world options); a rerun with the same key only evaluates.

Evaluation (pretraining/evaluate.py, one record per run under
<out>/<method>-seed<seed>/pretraining_eval.json): zero-shot (OpenAI ImageNet templates) on
the world's DomainBed images of the seen domains and of the held-out painting domain,
retrieval R@1/5/10 and the gap measures on the val pairs (never trained on), a linear
probe on the world's Dassl split. Then the tables (results/kind_pretraining.py) go to
<out>/tables, the summary is printed, and `projection_seed<seed>.png` shows the three
models' PCA projections side by side. Default out: output/pretraining/compare/<tag>, tag
naming epochs and the world, so different budgets never share a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

from common import cli
from common.files import staged_dir, write_atomic
from common.paths import CLIP_CACHE, OUTPUT
from pretraining import tiny_clip

METHODS = (
    ("CLIP", "tiny-clip-w64", ()),
    ("SharedCLIP", "tiny-sharedclip", ()),
    ("AlignCLIP-IMSep", "tiny-sharedclip", ("--clip-inModality-loss", "--nl_semantic_supervision")),
)
DEFAULT_EPOCHS = 6
DEFAULT_CACHE = CLIP_CACHE / "compare"
DEFAULT_OUT = OUTPUT / "pretraining" / "compare"
CHECKPOINT = "model.pt"
REPORT = "train.json"
_FORMAT = 1


def _hash(obj, n=12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def train_key(method, model, flags, config, world_opts) -> str:
    import open_clip
    from pretraining import sharedclip
    sharedclip.register_model_configs()
    return _hash({"format": _FORMAT, "method": method, "model": model, "flags": list(flags),
                  "model_config": open_clip.get_model_config(model),
                  "shared": sharedclip.is_shared(model), "config": dataclasses.asdict(config),
                  "world": world_opts})


def _run_imsep(args, stdout_path, desc, epochs):
    """`python -m pretraining.imsep ARGS` in a child process; progress from its out.log."""
    out_log = Path(args[args.index("--logs") + 1]) / args[args.index("--name") + 1] / "out.log"
    tiny_clip.follow_open_clip_train([sys.executable, "-m", "pretraining.imsep", *args],
                                     Path(stdout_path), out_log, epochs, desc,
                                     extra_env={"HF_HUB_OFFLINE": "1"})


def pretrain(method, model, flags, config, world_root, cache_dir) -> Path:
    """Cached checkpoint of one method (trained here when its key is not cached)."""
    from common.files import write_json_atomic
    world_root, cache_dir = Path(world_root).resolve(), Path(cache_dir).resolve()
    opts = tiny_clip.world_options(world_root)
    key = train_key(method, model, flags, config, opts)
    final = cache_dir / key
    if (final / CHECKPOINT).is_file() and (final / REPORT).is_file():
        return final / CHECKPOINT
    paths = json.loads((world_root / "WORLD_DONE.json").read_text())["paths"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    # the pairs CSV, copied once per world (the sentence sidecar lands beside it)
    data = cache_dir / f"data-{_hash(opts, 8)}"
    if not (data / "train.csv").is_file():
        write_atomic(data / "train.csv", lambda tmp: shutil.copyfile(paths["pairs_train_csv"], tmp))
    paths = dict(paths, pairs_train_csv=str(data / "train.csv"))
    with staged_dir(final, lambda final: (final / CHECKPOINT).is_file()) as work:
        args = tiny_clip.open_clip_train_args(config, paths, work / "logs") + list(flags)
        start = time.time()
        _run_imsep(args, work / "train.stdout", f"pretraining {method} seed {config.seed}",
                   config.epochs)
        seconds = time.time() - start
        _, val_loss = tiny_clip.keep_final_checkpoint(work / "logs" / "train", config.epochs,
                                                      work / CHECKPOINT)
        write_json_atomic(work / REPORT, {
            "key": key, "method": method, "model": model, "flags": list(flags),
            "config": dataclasses.asdict(config), "world": opts, "world_root": str(world_root),
            "train_seconds": round(seconds, 1), "final_val_clip_loss": val_loss,
            "open_clip_train_log": "logs/train/out.log"})
    return final / CHECKPOINT


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def evaluate_run(method, model, checkpoint, world_root, seed, out_dir, progress=True) -> Path:
    from pretraining import evaluate
    w = str(Path(world_root).resolve())
    argv = ["--model", model, "--checkpoint", str(checkpoint), "--method", method,
            "--seed", str(seed), "--zeroshot", f"world:{w}", "--retrieval", f"world:{w}",
            "--gap", f"world:{w}", "--linear-probe", f"world:{w}", "--out", str(out_dir),
            "--no-figures"]
    if not progress:
        argv.append("--quiet")
    args = evaluate.parse_args(argv)
    args.argv = argv
    return evaluate.evaluate(args)


def projection(records, path) -> Path:
    import numpy as np
    from pretraining import modality_gap
    panels = []
    for rec_path in records:
        rec = json.loads(Path(rec_path).read_text())
        name = next(iter(rec["gap"]))
        arrays = np.load(Path(rec_path).parent / rec["gap"][name]["embeddings"])
        panels.append((rec["method"], arrays["image"], arrays["text"]))
    return modality_gap.projection_figure(panels, path, title=f"PCA of {name} (per model)")


def parse_args(argv):
    d = tiny_clip.PretrainConfig()
    p = argparse.ArgumentParser(prog="python -m pretraining.compare",
                                description=__doc__.splitlines()[0])
    p.add_argument("--world", required=True, help="a generated world's root")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--wd", type=float, default=d.wd)
    p.add_argument("--methods", nargs="+", default=[m for m, _, _ in METHODS],
                   choices=[m for m, _, _ in METHODS])
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--out", help=f"default {DEFAULT_OUT}/<tag>")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from results import collect, tables as tables_mod
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        opts = tiny_clip.world_options(args.world)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.time()
    tag = f"e{args.epochs}-b{args.batch_size}-lr{args.lr:g}-world{_hash(opts, 6)}"
    out = Path(args.out) if args.out else DEFAULT_OUT / tag
    records = {}
    for seed in args.seeds:
        config = tiny_clip.PretrainConfig(model="", epochs=args.epochs, batch_size=args.batch_size,
                                          lr=args.lr, warmup=args.warmup, wd=args.wd, seed=seed)
        for method, model, flags in METHODS:
            if method not in args.methods:
                continue
            cfg = dataclasses.replace(config, model=model)
            ckpt = pretrain(method, model, flags, cfg, args.world, args.cache_dir)
            rec = evaluate_run(method, model, ckpt, args.world, seed,
                               out / f"{_slug(method)}-seed{seed}", progress=not args.quiet)
            records.setdefault(seed, []).append(rec)
    figures = [projection(recs, out / f"projection_seed{seed}.png") for seed, recs in records.items()]
    made, _, _ = collect.collect([out], out / "tables", figures=True)
    tables = [t for kind, ts in made if kind.name == "pretraining" for t in ts]
    summary = next(t for t in tables if t.name == "pretraining_summary")
    print(tables_mod.to_markdown(summary))
    print(f"records: {out}; tables: {out / 'tables'}; figures: "
          f"{', '.join(str(f) for f in figures)}; {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
