"""Every CLIPBENCH_* environment variable the harness reads, in one place."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from common import paths

NUM_WORKERS = "CLIPBENCH_NUM_WORKERS"          # DomainBed loader workers per environment (upstream: 8)
PARALLEL_JOBS = "CLIPBENCH_PARALLEL_JOBS"      # jobs at once of the local_parallel launcher (default: cores)
CACHE = "CLIPBENCH_CACHE"                      # feature-cache folder; "off" disables
COOP_DIR = "CLIPBENCH_COOP_DIR"                # CoOp checkout (default third_party/CoOp)
OPENAI_CLIP_DIR = "CLIPBENCH_OPENAI_CLIP_DIR"  # local OpenAI CLIP files for CoOp's trainers
TRACEBACK = "CLIPBENCH_TRACEBACK"              # full traceback instead of one line

OFF = ("", "0", "off", "none", "false")


def flag(name: str) -> bool:
    return (os.environ.get(name) or "").strip().lower() not in OFF


def num_workers() -> Optional[int]:
    value = os.environ.get(NUM_WORKERS)
    return None if value is None else int(value)


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
