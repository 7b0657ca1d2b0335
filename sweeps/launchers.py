"""Command launchers for DomainBed's sweep (`--command_launcher NAME`), registered into
domainbed.command_launchers.REGISTRY by the DomainBed adapter (domainbed_adapter/patches.py)."""
from __future__ import annotations

import os
import subprocess
import time

from common import env


def local_parallel_launcher(commands):
    """Run the sweep's commands on this machine, several at a time (default: one per
    core, each with its share of the cores as torch threads; CLIPBENCH_PARALLEL_JOBS).
    DomainBed's `local` launcher runs them one by one: on a CPU most of a short job is
    Python start-up."""
    jobs = env.parallel_jobs()
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    environment = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    pending, running = list(commands), []
    while pending or running:
        running = [p for p in running if p.poll() is None]
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(pending.pop(0), shell=True, env=environment))
        time.sleep(0.2)


def slurm_launcher(commands):
    """The sweep as one Slurm job array through submitit (options: CLIPBENCH_SLURM_*,
    sweeps/slurm.py); CLIPBENCH_SLURM_EXECUTOR=local runs it with submitit's local executor.
    submitit is imported only here: this module loads in every DomainBed process."""
    from sweeps import slurm
    slurm.domainbed_launcher(commands)


DOMAINBED_LAUNCHERS = {"local_parallel": local_parallel_launcher, "slurm": slurm_launcher}
