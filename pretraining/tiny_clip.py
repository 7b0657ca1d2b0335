"""Pretrain and cache the demo's tiny CLIP, then measure it zero-shot (docs: docs/demo.md).

Pretrain the embedded default's tiny CLIP on the world's image-caption pairs with
open_clip's own trainer (open_clip_train), cache the checkpoint, and measure its
zero-shot accuracy on held-out images of the seen domains and of the held-out domain.

    python -m pretraining.tiny_clip --world data/world [--cache-dir data/clip_cache] [--epochs N]

Two stages by default, both open_clip_train runs: a tiny ResNet CLIP (tiny-rn) learns
image and text towers from scratch; the tiny ViT (tiny-vit) then starts from its text
tower, locked (`--pretrained`, `--lock-text`), and learns its image tower. A tiny ViT
trained from scratch stayed near chance in the same few minutes on 2 CPU cores (its
image tower learns the shapes far more slowly than a CNN's), while AlignCLIP needs a ViT.

The checkpoint is `<cache-dir>/<key>/tiny-clip.pt` (a bare open_clip state_dict, loadable
with `backbone.load_clip(model, path)`), its report `tiny-clip.json` beside it;
<key> hashes the pretraining config, the model's JSON config and the world's options,
so a rerun with the same key does nothing. Training happens in a hidden temporary
directory that is renamed to <key> only once checkpoint and report are complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import cli
from common.paths import CLIP_CACHE, REPO

DEFAULT_CACHE_DIR = CLIP_CACHE
CHECKPOINT_NAME = "tiny-clip.pt"
REPORT_NAME = "tiny-clip.json"
METHOD = "CLIP"  # open_clip's CLIP and ClipLoss
TRAIN_FLAG = "--open-clip-train"  # `python -m pretraining.tiny_clip --open-clip-train ARGS...`
_FORMAT = 1  # bump when what is cached changes meaning


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides the weights; every field goes into the cache key.
    text_tower_from: a config whose checkpoint's text tower starts this run, locked."""
    model: str = "tiny-vit"
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 30
    wd: float = 0.1
    seed: int = 0
    device: str = "cpu"
    text_tower_from: "PretrainConfig | None" = None


TEXT_STAGE = PretrainConfig(model="tiny-rn")
DEFAULT_CONFIG = PretrainConfig(model="tiny-vit", text_tower_from=TEXT_STAGE)


# --------------------------------------------------------------------------- cache key
def world_options(world_root) -> dict:
    """The options the world was generated with (its WORLD_DONE.json marker)."""
    from clipworld import generate as world
    marker = Path(world_root) / world.MARKER
    try:
        return json.loads(marker.read_text())["options"]
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"no finished world at {world_root} ({marker.name}: {e}); "
                                f"generate it: python -m clipworld.generate --root {world_root}") from e


def cache_key(config: PretrainConfig, world_opts: dict) -> str:
    import open_clip
    from algorithms import backbone
    backbone.register_model_configs()
    blob = {"format": _FORMAT, "config": dataclasses.asdict(config), "world": world_opts,
            "model_config": open_clip.get_model_config(config.model)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def cached_checkpoint(cache_dir, key) -> Path | None:
    """The finished checkpoint for key, or None."""
    ckpt = Path(cache_dir) / key / CHECKPOINT_NAME
    return ckpt if ckpt.is_file() and ckpt.with_name(REPORT_NAME).is_file() else None


# --------------------------------------------------------------------------- training
def open_clip_train_args(config: PretrainConfig, paths: dict, logs_dir, init=None) -> list:
    """open_clip_train's command line for this config (csv dataset, one process);
    init: a checkpoint to start from whose text tower stays locked."""
    start = ["--pretrained", str(init), "--lock-text", "--lock-text-freeze-layer-norm"] \
        if init else []
    return [*start, "--model", config.model,
            "--train-data", paths["pairs_train_csv"], "--val-data", paths["pairs_val_csv"],
            "--dataset-type", "csv", "--csv-separator", "\t",
            "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--device", config.device, "--precision", "fp32", "--workers", "0",
            "--batch-size", str(config.batch_size), "--epochs", str(config.epochs),
            "--lr", str(config.lr), "--warmup", str(config.warmup), "--wd", str(config.wd),
            "--seed", str(config.seed), "--logs", str(logs_dir), "--name", "train",
            "--save-frequency", "0", "--val-frequency", "5", "--log-every-n-steps", "5",
            "--report-to", ""]


def run_open_clip_train(args: list) -> None:
    """Run open_clip_train.main in a child process that knows the harness's configs; its
    output goes to <logs>/<name>.stdout, its progress (from its out.log) to a bar."""
    logs, name = Path(args[args.index("--logs") + 1]), args[args.index("--name") + 1]
    logs.mkdir(parents=True, exist_ok=True)
    follow_open_clip_train([sys.executable, "-m", "pretraining.tiny_clip", TRAIN_FLAG, *args],
                           logs / f"{name}.stdout", logs / name / "out.log",
                           int(args[args.index("--epochs") + 1]),
                           f"pretraining {args[args.index('--model') + 1]}")


def follow_open_clip_train(cmd: list, stdout: Path, out_log: Path, epochs: int, desc: str,
                           extra_env: dict | None = None) -> None:
    """Run `cmd` (an open_clip_train run) with the repository importable, its output into
    `stdout`, and a progress bar read from open_clip_train's `out_log`; a failure raises
    with the last lines of its output and the file's name."""
    import re
    from tqdm import tqdm
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p), **(extra_env or {}))
    seen = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+)")
    with open(stdout, "w") as sink, tqdm(desc=desc, unit="pair") as bar:
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        while child.poll() is None:
            time.sleep(1)
            try:
                last = seen.findall(out_log.read_text())[-1:]
            except OSError:
                last = []
            if last:
                epoch, done, per_epoch = map(int, last[0])
                bar.total = epochs * per_epoch
                bar.update(epoch * per_epoch + done - bar.n)
    if child.returncode != 0:
        print("\n".join(Path(stdout).read_text().splitlines()[-15:]), file=sys.stderr)
        raise RuntimeError(f"open_clip_train failed (exit {child.returncode}); its output: "
                           f"{stdout}")


def _open_clip_train_main(args: list) -> int:
    """open_clip_train through pretraining/open_clip_run.py, open_clip's model and loss."""
    from pretraining import open_clip_run
    code, _ = open_clip_run.train(args, METHOD)
    return code


def text_tower_init(model: str, text_checkpoint, seed: int, out) -> Path:
    """A checkpoint of `model`, freshly initialised (seeded), with the text tower (every
    key outside `visual.`) of text_checkpoint, for open_clip_train's --pretrained."""
    import torch
    from algorithms import backbone
    torch.manual_seed(seed)
    fresh, _ = backbone.load_clip(model, None)
    state, text = fresh.state_dict(), torch.load(text_checkpoint, map_location="cpu",
                                                  weights_only=True)
    for key in state:
        if not key.startswith("visual."):
            if key not in text or text[key].shape != state[key].shape:
                raise ValueError(f"{text_checkpoint}: no text-tower weight {key} of shape "
                                 f"{tuple(state[key].shape)} for {model}")
            state[key] = text[key]
    torch.save({"state_dict": state}, out)
    return Path(out)


def keep_final_checkpoint(run_dir: Path, epochs: int, out: Path):
    """From an open_clip_train run folder: its last epoch's weights as a bare state dict
    at `out`, its last validation loss; the training checkpoints (optimizer state) are
    deleted. Returns (out, last val loss or None)."""
    checkpoints = Path(run_dir) / "checkpoints"
    ckpt = export_checkpoint(checkpoints / f"epoch_{epochs}.pt", out)
    val_loss = _last_val_loss(checkpoints / "results.jsonl")
    shutil.rmtree(checkpoints)
    return ckpt, val_loss


def export_checkpoint(train_ckpt, out) -> Path:
    """open_clip_train's epoch_N.pt -> a bare state_dict (no optimizer, no 'module.')."""
    import torch
    state = torch.load(train_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    torch.save(state, out)
    return Path(out)


def _last_val_loss(results_jsonl) -> float | None:
    try:
        lines = Path(results_jsonl).read_text().splitlines()
        return json.loads(lines[-1])["clip_val_loss"]
    except (OSError, ValueError, KeyError, IndexError):
        return None


# --------------------------------------------------------------------------- evaluation
def heldout_images(paths: dict) -> dict:
    """{'seen': [...], 'painting': [...]}: the DomainBed images (never in a pretraining
    pair) of the domains the pairs show (photo, sketch, cartoon) and of painting."""
    from clipworld import generate as world
    root = Path(paths["domainbed_dataset"])
    held_out = [d for d in world.DOMAINS if d not in world.PAIR_DOMAINS]
    files = lambda domains: sorted(str(p) for d in domains for p in (root / d).glob("*/*.png"))
    return {"seen": files(world.PAIR_DOMAINS), "painting": files(held_out)}


def zero_shot_eval(model_name: str, checkpoint, paths: dict, templates="photo",
                   device="cpu", progress=True) -> dict:
    """Zero-shot accuracy (the harness's ZSCLIP) of a CLIP on the held-out images."""
    import torch
    from tqdm import tqdm
    from algorithms import backbone
    from algorithms.core import registry
    from pretraining.datasets import ImageFiles
    from clipworld import generate as world
    method = registry.get_method("ZSCLIP").create(
        list(world.CLASSES), {"clip_model": model_name, "clip_pretrained": str(checkpoint),
                              "templates": templates}, device=device)
    method.eval()
    transform = backbone.clip_transform(backbone.image_size_of(model_name), train=False)
    folders = [world.class_folder(c) for c in world.CLASSES]
    per_domain = {}
    sets = heldout_images(paths)
    for name, files in sets.items():
        loader = torch.utils.data.DataLoader(ImageFiles(files, transform), batch_size=128)
        preds = []
        with torch.no_grad():
            for x in tqdm(loader, desc=f"zero-shot {name}", disable=not progress):
                preds.append(method.predict(x.to(device)).argmax(dim=1).cpu())
        preds = torch.cat(preds).tolist()
        for f, p in zip(files, preds):
            domain, label = Path(f).parent.parent.name, folders.index(Path(f).parent.name)
            hits = per_domain.setdefault(domain, [0, 0])
            hits[0] += int(p == label)
            hits[1] += 1

    def acc(domains):
        right = sum(per_domain[d][0] for d in domains)
        n = sum(per_domain[d][1] for d in domains)
        return {"accuracy": right / n if n else None, "n": n}

    seen_domains = [d for d in world.PAIR_DOMAINS if d in per_domain]
    return {"method": "ZSCLIP", "templates": templates, "chance": 1 / len(world.CLASSES),
            "seen_heldout": dict(acc(seen_domains), images="DomainBed images of photo, "
                                 "sketch, cartoon (the domains of the pairs; no image is in them)"),
            "painting": dict(acc(["painting"]), images="DomainBed images of painting (a "
                             "domain no pair shows)"),
            "by_domain": {d: acc([d]) for d in sorted(per_domain)}}


def format_report(report: dict) -> str:
    z = report["zero_shot"]
    by = ", ".join(f"{d} {v['accuracy']:.1%}" for d, v in z["by_domain"].items())
    return (f"{report['config']['model']} CLIP zero-shot accuracy (chance {z['chance']:.0%}): "
            f"held-out seen domains {z['seen_heldout']['accuracy']:.1%} "
            f"(n={z['seen_heldout']['n']}), painting {z['painting']['accuracy']:.1%} "
            f"(n={z['painting']['n']}) [{by}]; pretraining took "
            f"{report['train_seconds']:.0f} s")


# --------------------------------------------------------------------------- driver
def pretrain(world_root, cache_dir=DEFAULT_CACHE_DIR, config: PretrainConfig | None = None,
             progress=True) -> Path:
    """Checkpoint of the tiny CLIP pretrained on world_root's pairs: reused from
    cache_dir when its key is there, else trained with open_clip_train and evaluated."""
    from common.files import staged_dir, write_json_atomic
    config = config or DEFAULT_CONFIG
    world_root, cache_dir = Path(world_root).resolve(), Path(cache_dir).resolve()
    opts = world_options(world_root)
    key = cache_key(config, opts)
    done = cached_checkpoint(cache_dir, key)
    if done:
        return done
    text_from = None
    if config.text_tower_from is not None:
        text_from = pretrain(world_root, cache_dir, config.text_tower_from, progress)
        print(format_report(read_report(text_from)))
    paths = json.loads((world_root / "WORLD_DONE.json").read_text())["paths"]
    # published as <key> only when complete; a concurrent run may finish first
    with staged_dir(cache_dir / key,
                    lambda final: cached_checkpoint(cache_dir, key) is not None) as work:
        init = text_tower_init(config.model, text_from, config.seed, work / "init.pt") \
            if text_from else None
        facts = run_record(config, paths, init)
        start = time.time()
        run_open_clip_train(open_clip_train_args(config, paths, work / "logs", init))
        train_seconds = time.time() - start
        ckpt, val_loss = keep_final_checkpoint(work / "logs" / "train", config.epochs,
                                               work / CHECKPOINT_NAME)
        if init:
            init.unlink()
        zero_shot = zero_shot_eval(config.model, ckpt, paths, device=config.device,
                                   progress=progress)
        report = {"key": key, "config": dataclasses.asdict(config), "world": opts,
                  "text_tower_from": str(text_from) if text_from else None,
                  "world_root": str(world_root), "train_seconds": round(train_seconds, 1),
                  "final_val_clip_loss": val_loss, "zero_shot": zero_shot,
                  "checkpoint": CHECKPOINT_NAME, "open_clip_train_log": "logs/train/out.log",
                  "open_clip_train_stdout": "logs/train.stdout", "run": facts}
        write_json_atomic(work / REPORT_NAME, report)
    return cached_checkpoint(cache_dir, key)


def run_record(config: PretrainConfig, paths: dict, init) -> dict:
    """The report's "run" block (common/run_facts.py); init: the starting checkpoint
    (the text tower's stage) or None for random weights."""
    from common.run_facts import file_digest, run_facts
    flags = {k: v for k, v in dataclasses.asdict(config).items() if k != "text_tower_from"}
    return run_facts(protocol="pretraining", stage="train", method=METHOD,
                     config={**flags, "text_tower_from": config.text_tower_from.model
                             if config.text_tower_from else None},
                     precision="fp32",  # open_clip_train_args
                     backbone=config.model, weights_digest=file_digest(init),
                     dataset=Path(paths["pairs_train_csv"]).name, seeds={"seed": config.seed})


def read_report(checkpoint) -> dict:
    return json.loads(Path(checkpoint).with_name(REPORT_NAME).read_text())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [TRAIN_FLAG]:
        return _open_clip_train_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", required=True, help="a generated world's root")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    fields = [f for f in dataclasses.fields(PretrainConfig) if f.name != "text_tower_from"]
    for field in fields:
        default = getattr(DEFAULT_CONFIG, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default),
                            default=default)
    parser.add_argument("--text-stage-epochs", type=int, default=TEXT_STAGE.epochs,
                        help=f"epochs of the {TEXT_STAGE.model} stage whose text tower is reused")
    parser.add_argument("--from-scratch", action="store_true",
                        help="one stage: train both towers of --model from scratch")
    args = parser.parse_args(argv)
    text_stage = None if args.from_scratch else dataclasses.replace(
        TEXT_STAGE, epochs=args.text_stage_epochs, seed=args.seed, device=args.device)
    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields},
                            text_tower_from=text_stage)
    checkpoint = pretrain(args.world, args.cache_dir, config)
    print(format_report(read_report(checkpoint)))
    print(checkpoint)
    return 0


if __name__ == "__main__":
    cli.run(main)
