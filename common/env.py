"""Every CLIPBENCH_* environment variable the harness reads, in one place."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from common import paths

NUM_WORKERS = "CLIPBENCH_NUM_WORKERS"          # loader workers: per DomainBed environment (default below), pretraining.evaluate (default 0)
PARALLEL_JOBS = "CLIPBENCH_PARALLEL_JOBS"      # jobs at once of the local_parallel launcher (default: cores)
PARALLEL_SLOTS = "CLIPBENCH_PARALLEL_SLOTS"    # a folder: local_parallel launchers sharing it share those jobs
CACHE = "CLIPBENCH_CACHE"                      # feature-cache folder; "off" disables
COOP_DIR = "CLIPBENCH_COOP_DIR"                # CoOp checkout (default third_party/CoOp)
OPENAI_CLIP_DIR = "CLIPBENCH_OPENAI_CLIP_DIR"  # local OpenAI CLIP files for CoOp's trainers
TRACEBACK = "CLIPBENCH_TRACEBACK"              # 1: the traceback, not one `error:` line (common/cli.py)
# the Slurm launcher (common/slurm.py): DomainBed's `--command_launcher slurm` and the CoOp
# protocols' `--launcher slurm`; values and defaults in common/slurm.py's docstring
SLURM_CONFIG = "CLIPBENCH_SLURM_CONFIG"        # YAML file of the options below (lowercase keys)
SLURM = {name: f"CLIPBENCH_SLURM_{name.upper()}" for name in (
    "partition", "time", "gpus", "cpus", "mem", "array_parallelism", "sbatch", "setup",
    "executor", "wait")}

OFF = ("", "0", "off", "none", "false")


def flag(name: str) -> bool:
    return (os.environ.get(name) or "").strip().lower() not in OFF


def num_workers() -> Optional[int]:
    value = os.environ.get(NUM_WORKERS)
    return None if value is None else int(value)


UPSTREAM_WORKERS = 8  # DomainBed's N_WORKERS per environment


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def workers_per_environment(n_environments: int) -> int:
    """Data-loader workers per DomainBed environment: CLIPBENCH_NUM_WORKERS when set, else
    min(8, usable CPUs // environments), so that the training environments' loaders
    together use at most the CPUs there are (0: images load in the main process)."""
    value = num_workers()
    if value is not None:
        return value
    return min(UPSTREAM_WORKERS, usable_cpus() // max(1, n_environments))


def parallel_jobs() -> int:
    return max(1, int(os.environ.get(PARALLEL_JOBS) or os.cpu_count() or 1))


def cache_root() -> Optional[Path]:
    """The feature cache's folder, or None when CLIPBENCH_CACHE turns it off."""
    value = os.environ.get(CACHE)
    if value is None:
        return paths.FEATURE_CACHE
    return None if value.strip().lower() in OFF else Path(value)


def coop_dir() -> Path:
    return Path(os.environ.get(COOP_DIR) or paths.THIRD_PARTY / "CoOp")
