import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
THIRD_PARTY = REPO / "third_party"
TINY = {"clip_model": "tiny-vit", "clip_pretrained": "", "templates": "photo"}

os.environ.setdefault("CLIPBENCH_NUM_WORKERS", "0")
# under pytest-xdist each worker is one of several processes sharing the cores: one torch
# thread per worker and per process it starts (more threads than cores slow every one down)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
# the tests' feature-cache entries go to a folder of their own, not data/feature_cache
if "CLIPBENCH_CACHE" not in os.environ:
    import tempfile
    os.environ["CLIPBENCH_CACHE"] = tempfile.mkdtemp(prefix="clipbench-test-cache-")

from tests import entry_points  # noqa: E402  (after the environment above: its server's)


def upstream_missing(name: str, module: str):
    """Skip reason when an upstream is not installed at its pin in third_party/."""
    if not (THIRD_PARTY / name / ".git").exists():
        return f"{name} is not in third_party/ (run: python third_party/install.py)"
    if importlib.util.find_spec(module) is None:
        return f"{name} is in third_party/ but `import {module}` fails (rerun the installer)"
    return None


needs_domainbed = pytest.mark.skipif(bool(upstream_missing("DomainBed", "domainbed")),
                                     reason=upstream_missing("DomainBed", "domainbed") or "")
needs_coop = pytest.mark.skipif(
    bool(upstream_missing("Dassl.pytorch", "dassl") or upstream_missing("CoOp", "dassl")),
    reason=(upstream_missing("Dassl.pytorch", "dassl") or upstream_missing("CoOp", "dassl") or ""))


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    from clipworld import generate as world
    root = tmp_path_factory.mktemp("world")
    return world.generate_world(root, seed=0, image_size=64, per_class_domain=10,
                                compositional_per_class=2, pretrain_per_class_domain=10)


@pytest.fixture(scope="session")
def tiny_clip():
    from algorithms import backbone
    import torch
    torch.manual_seed(0)
    return backbone.load_clip("tiny-vit", None)


# the longest modules (pytest --durations, 2 cores), started first under pytest-xdist
# (`make test`: --dist loadfile --no-loadscope-reorder) so that the workers end together;
# only the order of modules changes, and only under xdist
LONGEST_FIRST = ("test_coop_protocols", "test_faults_domainbed", "test_slurm_launcher",
                 "test_upstream_prompt_learners", "test_faults_coop", "test_imsep_train",
                 "test_calip", "test_faults_pretraining", "test_compare_pretraining",
                 "test_integration_domainbed", "test_open_world", "test_upstream_domainbed_suite",
                 "test_adapters_tip_clip", "test_tiny_clip_pretraining", "test_clip_benchmark",
                 "test_integration_coop", "test_domain_gap")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable


def run(cmd, cwd=REPO, env=None, timeout=600, fresh=False):
    """subprocess.run(cmd, ...) with output captured as text. A `python -m X` or `python
    script.py` run goes to a forked child of a server that imported torch, open_clip,
    DomainBed and Dassl once (tests/entry_points.py: the same run without the interpreter
    start); `fresh=True`, `-c` code and runs that change interpreter variables start a
    real process."""
    import subprocess
    full_env = dict(os.environ, **(env or {}))
    if not fresh and entry_points.can_fork(cmd, full_env):
        return entry_points.run_forked(cmd, cwd, full_env, timeout)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


PY = sys.executable


def train_domainbed(algorithm, world, out, hparams, *args, cwd=None, env=None, timeout=600):
    """`python -m domainbed.scripts.train --algorithm ALGORITHM` on the generated world
    (CLIPWorld) into `out` with `hparams`; `args`: further flags (--test_envs, --steps,
    ...); run in `cwd` (default: the folder holding `out`)."""
    import json
    return run([PY, "-m", "domainbed.scripts.train", "--algorithm", algorithm,
                "--dataset", "CLIPWorld", "--data_dir", world["domainbed_root"],
                *map(str, args), "--output_dir", str(out), "--hparams", json.dumps(hparams)],
               cwd=cwd or Path(out).parent, env=env, timeout=timeout)


def job_records(job) -> list:
    """Every record of a DomainBed job's results.jsonl (a corrupt line fails the test)."""
    import json
    return [json.loads(line) for line in (Path(job) / "results.jsonl").read_text().splitlines()]


PETS_CONFIG = THIRD_PARTY / "CoOp" / "configs" / "datasets" / "oxford_pets.yaml"
CLIP_WORLD_CONFIG = REPO / "trainers" / "configs" / "datasets" / "clip_world.yaml"
TINY_VIT_CONFIG = REPO / "trainers" / "configs" / "backbones" / "tiny_vit.yaml"


def train_coop(trainer, world, out, *args, dataset=PETS_CONFIG, seed=1, env=None, timeout=300):
    """`python train_coop.py --trainer TRAINER` on the generated world in CoOp's layout
    (`dataset`: a Dassl dataset config) with the tiny ViT's config, into `out`; `args`:
    further flags, then Dassl options (KEY VALUE ...); `seed=None` passes no --seed."""
    seeded = ["--seed", str(seed)] if seed is not None else []
    return run([PY, "train_coop.py", "--trainer", trainer, "--root", world["coop_root"],
                "--dataset-config-file", str(dataset), "--config-file", str(TINY_VIT_CONFIG),
                *seeded, "--output-dir", str(out), *map(str, args)], env=env, timeout=timeout)


def base_then_new(trainer, world, root, *base_options, dataset=PETS_CONFIG):
    """A base-to-new chain as CoOp's scripts run it: `trainer` trained on 2 shots of the
    base classes into root/base, then root/new evaluates that run's epoch-1 checkpoint on
    the new classes. (base result, new result); new is None when the base run failed."""
    base = train_coop(trainer, world, root / "base", "DATASET.NUM_SHOTS", "2",
                      "DATASET.SUBSAMPLE_CLASSES", "base", *base_options, dataset=dataset)
    if base.returncode:
        return base, None
    new = train_coop(trainer, world, root / "new", "--eval-only", "--model-dir", root / "base",
                     "--load-epoch", "1", "DATASET.SUBSAMPLE_CLASSES", "new", dataset=dataset)
    return base, new


def launch_sweep(argv, cwd, env=None):
    """`python -m domainbed.scripts.sweep launch ARGV`, its jobs run by `run` one after
    the other: DomainBed's `dummy` launcher lays the sweep out and prints the train commands.
    For tests whose subject is not the launcher. The first failure, else the sweep's output."""
    import shlex
    argv = [str(a) for a in argv]
    argv[argv.index("--command_launcher") + 1] = "dummy"
    laid_out = run([PY, "-m", "domainbed.scripts.sweep", "launch", *argv], cwd=cwd, env=env)
    for line in laid_out.stdout.splitlines() if laid_out.returncode == 0 else ():
        if line.startswith("Dummy launcher: "):
            tokens = shlex.split(line.split(": ", 1)[1])  # python -m domainbed.scripts.train ...
            job = run([PY, *tokens[1:]], cwd=cwd, env=env)
            if job.returncode:
                return job
    return laid_out
