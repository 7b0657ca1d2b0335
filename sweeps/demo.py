"""The embedded default: generate the world, run DomainBed's own sweep of every
registered harness algorithm on it, and collect the results with DomainBed's
collect_results. Rerunning resumes: finished jobs are not redone.

    python -m sweeps.demo [--root data/world] [--output results/demo] [--algorithms ...]

Until the tiny CLIP is pretrained by the demo (sweeps/pretrain.py), it runs on a randomly
initialised tiny CLIP, so accuracies are at chance; by default it sweeps the methods
that need no training (one step each).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from algorithms import registry
from sweeps import world

REPO = Path(__file__).resolve().parent.parent
TINY_CLIP = {"clip_model": "tiny-vit", "clip_pretrained": ""}
DEFAULT_ALGORITHMS = ("ZSCLIP", "CALIP")


def domainbed_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import domainbed.algorithms"],
                           capture_output=True, text=True)
    return probe.returncode == 0


def sweep_args(data_dir, output_dir, algorithms, hparams, steps, n_hparams, n_trials):
    return ["--datasets", "CLIPWorld", "--algorithms", *algorithms,
            "--data_dir", str(data_dir), "--output_dir", str(output_dir),
            "--command_launcher", "local", "--n_hparams", str(n_hparams),
            "--n_trials", str(n_trials), "--single_test_envs", "--steps", str(steps),
            "--hparams", json.dumps(hparams, sort_keys=True), "--skip_confirmation"]


def run_sweep(data_dir, output_dir, algorithms, hparams, steps=1, n_hparams=1, n_trials=1):
    env = dict(os.environ, CLIPBENCH_NUM_WORKERS=os.environ.get("CLIPBENCH_NUM_WORKERS", "0"))
    args = sweep_args(data_dir, output_dir, algorithms, hparams, steps, n_hparams, n_trials)
    for command in ("delete_incomplete", "launch"):
        subprocess.run([sys.executable, "-m", "domainbed.scripts.sweep", command, *args],
                       check=True, env=env)


def collect(output_dir) -> str:
    out = subprocess.run([sys.executable, "-m", "domainbed.scripts.collect_results",
                          "--input_dir", str(output_dir)],
                         check=True, capture_output=True, text=True)
    return out.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(REPO / "data" / "world"))
    parser.add_argument("--output", default=str(REPO / "results" / "demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", nargs="+", default=list(DEFAULT_ALGORITHMS),
                        choices=sorted(registry.methods()))
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args(argv)
    if not domainbed_available():
        print("demo: DomainBed is not importable (run: python third_party/install.py); "
              "nothing was run", file=sys.stderr)
        return 2
    paths = world.generate_world(args.root, seed=args.seed, progress=True)
    algorithms = args.algorithms
    sweep_dir = Path(args.output) / "sweep"
    print(f"demo: sweeping {', '.join(algorithms)} on CLIPWorld -> {sweep_dir}")
    run_sweep(paths["domainbed_root"], sweep_dir, algorithms, TINY_CLIP, steps=args.steps)
    table = collect(sweep_dir)
    print(table)
    print(f"demo: tables saved in {sweep_dir}/results.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
