"""Helpers of the fault tests (tests/test_faults_*.py): start a command in its own process
group, wait for a file to appear, find and SIGKILL the processes it started."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists() or sys.platform != "linux",
                                reason="finding a job's processes reads /proc (Linux)")


def start(cmd, cwd=REPO, env=None, log=None) -> subprocess.Popen:
    """`cmd` in a new session (its own process group), output to `log` (or discarded)."""
    sink = open(log, "w") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, **(env or {})), stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log:
            sink.close()  # the child has its own copy


def wait_for(condition, what: str, timeout=240, proc=None, interval=0.05):
    """Poll `condition()` until it returns something truthy; fail naming `what`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = condition()
            if value:
                return value
            pytest.fail(f"the command ended (exit {proc.returncode}) before {what}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of `proc`'s group (it was started with start())."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, grandchildren, ...), from /proc."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def argv_of(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def kill_descendant(root: subprocess.Popen, *needles: str) -> int:
    """SIGKILL the python process below `root` whose command line holds every needle;
    returns its pid."""
    for pid in descendants(root.pid):
        argv = argv_of(pid)
        line = " ".join(argv)
        # the interpreter itself, not the `sh -c "python ..."` a launcher runs it through
        if argv and os.path.basename(argv[0]).startswith("python") and \
                all(n in line for n in needles):
            os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:  # gone
                    break
                if ") Z" in stat:  # a zombie: dead, not yet reaped by its parent
                    break
                time.sleep(0.05)
            return pid
    pytest.fail(f"no running process below {root.pid} with {needles}")
