"""Entry points run as `python -m X` / `python script.py` would, without an interpreter start
each: one server process imports torch, torchvision, open_clip, DomainBed and Dassl once,
then forks a child per run. The child gets the run's argv (`__main__` through runpy), cwd,
whole environment, stdin from /dev/null and its own stdout/stderr files; its exit status is
the run's. A tiny DomainBed job spends about 6 of its 9 CPU seconds importing (2-core
machine), and the suite starts some hundred of them.

What is not the same as a fresh interpreter: modules the server imported are imported
already (their import-time side effects happened once, in the server; WILDS's disabling
of logging is undone there, so every run logs as one that never imported WILDS), and
interpreter-level settings (PYTHON* variables, thread counts read at torch's import) are
the server's. `tests.conftest.run` therefore sends only `-m` and script runs whose
environment changes none of those; `-c` code, `fresh=True` and the fault tests (which
signal real process groups) start real processes."""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
BASE_ENV = dict(os.environ)  # as tests/conftest.py set it up; the server starts with it

SERVER = r"""
import json, os, runpy, sys, warnings
for name in sys.argv[1:]:
    try:
        __import__(name)
    except Exception as e:  # an upstream that is not installed: its tests are skipped
        print(f"preload {name}: {e}", file=sys.stderr)
import logging
logging.disable(logging.NOTSET)  # WILDS (imported by DomainBed and Dassl) disables logging
# on import; a run that imports neither logs as in a fresh interpreter (open_clip_train)
try:  # CoOp's train.py prints Dassl's environment report: 2.5 s of `pip list` per run
    import dassl.utils
    dassl.utils.collect_env_info = lambda: "(not collected under tests/entry_points.py)"
except ImportError:
    pass
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)  # its own process group: a timeout kills what it started too
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            warnings.filterwarnings("ignore", message=".*found in sys.modules after import")
            sys.argv = [job["target"], *job["argv"]]
            try:
                if job["target"].endswith(".py"):
                    sys.path.insert(0, os.path.dirname(os.path.abspath(job["target"])))
                    runpy.run_path(job["target"], run_name="__main__")
                else:
                    runpy.run_module(job["target"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:  # as the interpreter handles it
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                sys.excepthook(*sys.exc_info())  # to sys.stderr, as an uncaught exception
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""
PRELOAD = ["torch", "torchvision", "open_clip", "yaml", "algorithms.backbone",
           "algorithms.core.registry", "domainbed.scripts.train", "domainbed.scripts.sweep",
           "dassl.config", "dassl.data", "dassl.engine", "trainers.dassl_adapter",
           "trainers.coop_runner", "pretraining.evaluate", "results.collect"]
# variables read when the interpreter or torch starts: a run that changes one starts afresh
INTERPRETER_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def last_error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def last_output_line(self) -> str:
        lines = [line for line in (self.stdout + "\n" + self.stderr).splitlines() if line.strip()]
        return lines[-1] if lines else ""


class EntryPoints:
    """One server process; run() forks a child per entry-point run."""

    def __init__(self, workdir: Path, env: Optional[dict] = None):
        self.workdir, self.count = Path(workdir), 0
        self.env = dict(BASE_ENV, **(env or {}))
        self.proc = subprocess.Popen([PY, "-c", SERVER, *PRELOAD], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.workdir / "server.err", "w"),
                                     env=self.env)
        assert self._line(300) == "ready", (self.workdir / "server.err").read_text()

    def _line(self, timeout) -> Optional[str]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def run(self, target: str, argv, cwd=REPO, env=None, timeout=180,
            whole_env: Optional[dict] = None) -> Result:
        """`env`: variables added to the server's environment; `whole_env`: the child's
        whole environment instead. A run past `timeout` is killed (with what it started)
        and raises subprocess.TimeoutExpired."""
        self.count += 1
        out, err = (self.workdir / f"{self.count}.{s}" for s in ("out", "err"))
        environment = whole_env if whole_env is not None else {**self.env, **(env or {})}
        job = {"target": str(target), "argv": [str(a) for a in argv], "cwd": str(cwd),
               "env": environment, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self._line(60))["pid"]
        reply = self._line(timeout)
        if reply is None:  # a hang (e.g. a loader spinning forever) is a failure too
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._line(60)
            raise subprocess.TimeoutExpired([target, *argv], timeout,
                                            out.read_text(), err.read_text())
        return Result(json.loads(reply)["rc"], out.read_text(), err.read_text())

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


_SERVER: Optional[EntryPoints] = None


def server() -> EntryPoints:
    """This process's server, started on first use, closed at exit."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = EntryPoints(Path(tempfile.mkdtemp(prefix="clipbench-entry-points-")))
        atexit.register(_SERVER.close)
    return _SERVER


def target_of(cmd) -> Optional[tuple[str, list]]:
    """(module or script, argv) for `[python, -m, module, ...]` / `[python, script.py, ...]`,
    None for anything else (`-c` code, other programs, interpreter options)."""
    cmd = [str(c) for c in cmd]
    if len(cmd) < 2 or cmd[0] != PY:
        return None
    if cmd[1] == "-m" and len(cmd) > 2:
        return cmd[2], cmd[3:]
    if cmd[1].endswith(".py") and not cmd[1].startswith("-"):
        return cmd[1], cmd[2:]
    return None


def can_fork(cmd, env: dict) -> bool:
    if target_of(cmd) is None:
        return False
    changed = {k for k in {*env, *BASE_ENV} if env.get(k) != BASE_ENV.get(k)}
    return not any(k.startswith("PYTHON") or k in INTERPRETER_VARIABLES for k in changed)


def run_forked(cmd, cwd, env: dict, timeout) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)` for a run
    `can_fork` accepts, in a child of the server."""
    target, argv = target_of(cmd)
    result = server().run(target, argv, cwd=cwd, whole_env=env, timeout=timeout)
    return subprocess.CompletedProcess([str(c) for c in cmd], result.rc, result.stdout,
                                       result.stderr)
