"""Command launchers for DomainBed's sweep (`--command_launcher NAME`), registered into
domainbed.command_launchers.REGISTRY by the patch table (domainbed_adapter/patches.py):
`local_parallel` and `slurm` (a submitit job array, common/slurm.py)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import env


def local_parallel_launcher(commands):
    """Run the sweep's commands on this machine, several at a time (default: one per
    core, each with its share of the cores as torch threads; CLIPBENCH_PARALLEL_JOBS).
    DomainBed's `local` launcher runs them one by one: on a CPU most of a short job is
    Python start-up. Each runs on this interpreter (DomainBed's commands say `python`).
    Sweeps launched side by side with the same CLIPBENCH_PARALLEL_SLOTS
    folder share the jobs at once between them (a lock file per slot)."""
    jobs = env.parallel_jobs()
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    environment = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    slots = SlotPool(os.environ.get(env.PARALLEL_SLOTS), jobs)
    pending, running = list(commands), []
    while pending or running:
        for process, slot in running:
            if process.poll() is not None:
                slots.release(slot)
        running = [(p, slot) for p, slot in running if p.returncode is None]
        while pending and (slot := slots.acquire()) is not None:
            running.append((subprocess.Popen(this_python(pending.pop(0)), shell=True,
                                             env=environment), slot))
        time.sleep(0.2)


class SlotPool:
    """`size` slots for jobs: this process's own, or, given a folder, shared with every
    process that uses the same folder (slot i is held by an flock on slot-i.lock, which
    the kernel releases if the holder dies)."""

    def __init__(self, folder, size: int):
        self.folder, self.size, self.taken = folder and Path(folder), size, set()
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def acquire(self):
        """A free slot (released with `release`), or None when all are taken."""
        if not self.folder:
            free = [i for i in range(self.size) if i not in self.taken]
            if free:
                self.taken.add(free[0])
            return free[0] if free else None
        import fcntl
        for i in range(self.size):
            handle = open(self.folder / f"slot-{i}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except OSError:
                handle.close()
        return None

    def release(self, slot) -> None:
        if self.folder:
            slot.close()  # drops the flock
        else:
            self.taken.discard(slot)


def output_dir(command: str) -> str | None:
    """The --output_dir of a DomainBed train command."""
    tokens = shlex.split(command)
    for i, token in enumerate(tokens[:-1]):
        if token == "--output_dir":
            return tokens[i + 1]
    return None


def this_python(command: str) -> str:
    """DomainBed's commands start with `python`: run them on this interpreter, as
    submitit runs its own part."""
    if command.startswith("python "):
        return shlex.quote(sys.executable) + command[len("python"):]
    return command


def slurm_launcher(commands) -> None:
    """The sweep as one Slurm job array through submitit (options: CLIPBENCH_SLURM_*,
    common/slurm.py); CLIPBENCH_SLURM_EXECUTOR=local runs it with submitit's local executor.
    DomainBed's launcher contract: `commands` are the sweep's train commands, whose
    job folders sweep.py has just made. Each becomes one task of one job array; its
    `done` file appears only when it finished, so `delete_incomplete` + `launch` resumes.
    On a bad option or a refused submission nothing runs and the (empty) job folders
    are removed again, so the next `launch` submits them. submitit is imported only
    when this launcher runs: this module loads in every DomainBed sweep process."""
    from common import slurm
    commands = list(commands)
    if not commands:
        return
    cwd = os.getcwd()
    dirs = [output_dir(c) for c in commands]
    parents = {str(Path(cwd, d).resolve().parent) for d in dirs if d}
    sweep_dir = Path(os.path.commonpath(sorted(parents))) if parents else Path(cwd)
    labels = [str(Path(cwd, d).resolve()) if d else c[:80] for d, c in zip(dirs, commands)]
    try:
        options = slurm.resolve()
        outcome = slurm.submit(slurm.run_shell, [(this_python(c), cwd) for c in commands],
                               labels, options, sweep_dir / "slurm_logs", "clipbench-domainbed")
    except slurm.SlurmError as e:
        for d in dirs:
            try:
                if d:
                    os.rmdir(Path(cwd, d))  # only an empty folder: never a run's output
            except OSError:
                pass
        print(f"slurm launcher: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if outcome.failed:
        print(f"slurm: {len(outcome.failed)} job(s) failed; `python -m domainbed.scripts.sweep "
              "delete_incomplete` with the same arguments, then `launch`, reruns them",
              flush=True)


DOMAINBED_LAUNCHERS = {"local_parallel": local_parallel_launcher, "slurm": slurm_launcher}
