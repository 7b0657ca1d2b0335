"""The embedded default: every method on generated data, on a CPU (docs: docs/demo.md).

Steps: generate the world, pretrain the tiny CLIP on its image-caption
pairs (open_clip_train, cached), run DomainBed's own sweep of every algorithm the harness
registers on it, then DomainBed's collect_results and the harness's tables.
Rerunning resumes: the world, the checkpoint and finished jobs are reused.

    python -m sweeps.demo [--root data/world] [--output output/demo] [--algorithms ...]

Every algorithm runs with its declared defaults except what demo_hparams sets for the
tiny CLIP: its checkpoint, the 'photo' template it was pretrained with and the recipe
book's `tiny` and `demo` values (recipes/recipes.yaml: for a method that declares
`trains`, a batch of 16 per domain; e.g. a learning rate that moves a tiny model in a few
dozen steps). Training methods run --steps steps (their schedule spans them), the others
one. Each domain is held out in turn; one trial.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

import recipes
from algorithms.core import registry
from algorithms.core.config import build_config
from clipworld import generate as world
from common import cli, env
from common.paths import OUTPUT, WORLD
from pretraining import tiny_clip as pretrain


# discovered methods the demo leaves out unless named in --algorithms, and why
LEFT_OUT = {
    "CALIPPaper": "the paper's betas are per CoOp dataset; CLIPWorld would get ImageNet's",
    "TipAdapter": "its cache fills during training steps: one step would hold one batch",
    **dict.fromkeys(("LPFT", "FLYP", "MIRO", "CLIPAdapter", "TipAdapterF", "DPL",
                     "CoOpHarness", "CoCoOpHarness", "KgCoOp"),
                    "training jobs past the demo's 10 minutes: the robust fine-tuning "
                    "family's sweep is in docs/demo.md; --algorithms NAME runs any"),
}


def default_algorithms() -> list[str]:
    return sorted(set(registry.methods()) - set(LEFT_OUT))


def demo_hparams(algorithm: str, checkpoint, model: str) -> dict:
    """What the demo changes of an algorithm's defaults (all of it goes in --hparams):
    the tiny CLIP, its template, and the recipe book's `tiny` and `demo` values
    (recipes/recipes.yaml: e.g. a learning rate that moves a tiny model in a few dozen
    steps, a batch of 16 per domain); checked as the method's config is."""
    method_cls = registry.get_method(algorithm)
    hp = {"clip_model": model, "clip_pretrained": str(checkpoint), "templates": "photo",
          **recipes.values(algorithm, "tiny"), **recipes.values(algorithm, "demo")}
    build_config(method_cls, {k: v for k, v in hp.items() if k not in recipes.DOMAINBED_KEYS},
                 f"the demo's hyperparameters for {algorithm}")
    return hp


def sweep_groups(algorithms, checkpoint, model, steps) -> list[tuple[list, dict, int]]:
    """(algorithms, --hparams, --steps): algorithms that share their --hparams go into
    one sweep command; one step (one evaluation) for those that do not train."""
    groups = {}
    for algorithm in algorithms:
        hp = demo_hparams(algorithm, checkpoint, model)
        groups.setdefault(json.dumps(hp, sort_keys=True), (hp, []))[1].append(algorithm)
    runs = [(names, hp, steps if registry.get_method(names[0]).trains else 1)
            for hp, names in groups.values()]
    return sorted(runs, key=lambda run: -run[2])  # the long jobs start first


def domainbed_available() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(name) for name in ("domainbed", "wilds"))


def sweep_args(data_dir, output_dir, algorithms, hparams, steps, trials=1):
    return ["--datasets", "CLIPWorld", "--algorithms", *algorithms,
            "--data_dir", str(data_dir), "--output_dir", str(output_dir),
            "--command_launcher", "local_parallel", "--n_hparams", "1", "--n_trials", str(trials),
            "--single_test_envs", "--steps", str(steps),
            "--hparams", json.dumps(hparams, sort_keys=True), "--skip_confirmation"]


def has_incomplete_jobs(sweep_dir) -> bool:
    """A job folder without DomainBed's `done` file (an interrupted run)."""
    return any(d.is_dir() and not (d / "done").exists() for d in Path(sweep_dir).glob("*"))


def run_sweeps(data_dir, output_dir, groups, trials=1) -> None:
    """One `python -m domainbed.scripts.sweep launch` per group of algorithms that share
    their --hparams (it skips jobs whose `done` file exists; `delete_incomplete` first when
    an interrupted job is there), all side by side: their local_parallel launchers share
    one pool of jobs at once (CLIPBENCH_PARALLEL_SLOTS), so no core idles between groups."""
    environment = dict(os.environ, **{env.NUM_WORKERS: os.environ.get(env.NUM_WORKERS, "0"),
                                      env.PARALLEL_SLOTS: str(Path(output_dir).parent / ".slots")})
    commands = [sweep_args(data_dir, output_dir, algorithms, hparams, steps, trials)
                for algorithms, hparams, steps in groups]
    if has_incomplete_jobs(output_dir):
        for args in commands:
            subprocess.run([sys.executable, "-m", "domainbed.scripts.sweep", "delete_incomplete",
                            *args], check=True, env=environment, stdout=subprocess.DEVNULL)
    algorithms = [name for names, _, _ in groups for name in names]
    log_path = Path(output_dir).parent / "sweep_launch.log"  # DomainBed's own progress bars
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    launches = [subprocess.Popen([sys.executable, "-m", "domainbed.scripts.sweep", "launch",
                                  *args], env=environment, stdout=log, stderr=log)
                for args in commands]
    with tqdm(total=len(algorithms) * len(world.DOMAINS) * trials, desc="jobs done",
              unit="job") as bar:
        while any(launch.poll() is None for launch in launches):
            time.sleep(1)
            bar.update(count_done(output_dir, algorithms) - bar.n)
        bar.update(count_done(output_dir, algorithms) - bar.n)
    log.close()
    for launch in launches:
        if launch.returncode != 0:
            raise RuntimeError(f"a DomainBed sweep failed (exit {launch.returncode}); "
                                 f"its output: {log_path}")


def count_done(sweep_dir, algorithms) -> int:
    """Finished DomainBed jobs of these algorithms (`done` beside their results.jsonl)."""
    n = 0
    for done in Path(sweep_dir).glob("*/done"):
        try:
            with open(done.parent / "results.jsonl") as f:
                n += json.loads(f.readline())["args"]["algorithm"] in algorithms
        except (OSError, ValueError, KeyError):
            pass
    return n


def collect_domainbed(sweep_dir) -> subprocess.Popen:
    """DomainBed's collect_results, in the background (it writes <sweep_dir>/results.txt)."""
    return subprocess.Popen([sys.executable, "-m", "domainbed.scripts.collect_results",
                             "--input_dir", str(sweep_dir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


SUMMARY_TABLE = "domainbed_iid_in_vs_out_of_domain"  # written by results/kind_domainbed.py
REFERENCE = "ZSCLIP"


def summary(csv_path, model: str, trials: int) -> str:
    """The demo's one table: each method's in-domain and out-of-domain accuracy (model
    selection by training-domain validation), zero-shot CLIP first as the reference and
    every method's difference to it, in points."""
    import pandas as pd
    cells = pd.read_csv(csv_path)
    cells = cells[cells["role"] == "measured"]
    kind = cells["column"].str.extract(r"(in-domain|out-of-domain)$")[0]
    mean = cells.assign(kind=kind).pivot_table(index="row", columns="kind", values="mean")
    err = cells.assign(kind=kind).pivot_table(index="row", columns="kind", values="err")
    order = [REFERENCE] * (REFERENCE in mean.index) + sorted(set(mean.index) - {REFERENCE})
    rows = []
    for method in order:
        row = {"Method": f"{method} (zero-shot reference)" if method == REFERENCE else method}
        for kind in ("in-domain", "out-of-domain"):
            row[kind.capitalize()] = f"{mean.at[method, kind]:.1f} ± {err.at[method, kind]:.1f}"
        for kind in ("in-domain", "out-of-domain"):
            delta = (mean.at[method, kind] - mean.at[REFERENCE, kind]
                     if REFERENCE in mean.index and method != REFERENCE else None)
            row[f"Δ {kind} vs {REFERENCE}"] = "—" if delta is None else f"{delta:+.1f}"
        rows.append(row)
    title = (f"CLIPWorld, {model}: accuracy (%) selected by training-domain validation, mean "
             f"± standard error over {trials} trial(s), each domain held out in turn")
    return f"\n{title}\n\n" + pd.DataFrame(rows).to_markdown(index=False,
                                                                colalign=("left",) + ("right",) * 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(WORLD))
    parser.add_argument("--output", default=str(OUTPUT / "demo"))
    parser.add_argument("--cache-dir", default=str(pretrain.DEFAULT_CACHE_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=1,
                        help="DomainBed trials (trial seeds) per job; 2+ gives a seed spread")
    parser.add_argument("--algorithms", nargs="+", default=default_algorithms(),
                        choices=sorted(registry.methods()), metavar="NAME",
                        help="default: every registered method but " + "; ".join(
                            f"{', '.join(n for n in LEFT_OUT if LEFT_OUT[n] == why)} ({why})"
                            for why in dict.fromkeys(LEFT_OUT.values())))
    parser.add_argument("--steps", type=int, default=100,
                        help="DomainBed steps of each job that trains")
    args = parser.parse_args(argv)
    if not domainbed_available():
        print("demo: DomainBed is not importable (run: python third_party/install.py); "
              "nothing was run", file=sys.stderr)
        return 2
    start = time.time()
    paths = world.generate_world(args.root, seed=args.seed, progress=True)
    checkpoint = pretrain.pretrain(args.root, args.cache_dir)
    report = pretrain.read_report(checkpoint)
    print(pretrain.format_report(report))
    output = Path(args.output)
    sweep_dir = output / "sweep"
    groups = sweep_groups(args.algorithms, checkpoint, report["config"]["model"], args.steps)
    run_sweeps(paths["domainbed_root"], sweep_dir, groups, args.trials)
    domainbed_tables = collect_domainbed(sweep_dir)
    tables_dir = output / "tables"
    from results import collect
    collected = collect.main([str(sweep_dir), "--out", str(tables_dir), "--quiet"])
    if domainbed_tables.wait() != 0 or collected != 0:
        return 1
    print(summary(tables_dir / f"{SUMMARY_TABLE}.csv", report["config"]["model"], args.trials))
    print(f"\ndemo: every table (.md, .tex, .csv) and figure in {tables_dir}; DomainBed's own "
          f"tables: python -m domainbed.scripts.collect_results --input_dir {sweep_dir} "
          f"(also in {sweep_dir / 'results.txt'}); {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
