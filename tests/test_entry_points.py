"""The tests' fork server (tests/entry_points.py) runs an entry point as a fresh
interpreter would: same exit status, output, working directory and environment."""
import os

import pytest

from tests import entry_points
from tests.conftest import PY, REPO, run


def test_a_forked_run_equals_a_fresh_process():
    cmd = [PY, "-m", "clipworld.generate", "--help"]
    forked, fresh = run(cmd), run(cmd, fresh=True)
    assert forked.returncode == fresh.returncode == 0
    assert forked.stdout == fresh.stdout and "usage:" in forked.stdout


def test_exit_status_stderr_cwd_and_environment_reach_the_child(tmp_path):
    bad = [PY, "-m", "results.collect", "missing_sweep"]
    forked, fresh = run(bad, cwd=tmp_path), run(bad, cwd=tmp_path, fresh=True)
    assert forked.returncode == fresh.returncode != 0
    assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
    assert "missing_sweep" in forked.stderr
    script = tmp_path / "show.py"
    script.write_text("import os, sys\nprint(os.getcwd(), os.environ['SHOWN'], sys.argv[1:])\n"
                      "sys.exit(3)\n")
    result = run([PY, str(script), "a", "b"], cwd=tmp_path, env={"SHOWN": "yes"})
    assert result.returncode == 3
    assert result.stdout.split() == [str(tmp_path), "yes", "['a',", "'b']"]
    again = run([PY, str(script), "c"], cwd=REPO, env={"SHOWN": "again"})
    assert again.stdout.split() == [str(REPO), "again", "['c']"]  # nothing left from the last


def test_what_must_start_a_real_interpreter_does():
    env = dict(os.environ)
    assert entry_points.can_fork([PY, "-m", "sweeps.demo"], env)
    assert not entry_points.can_fork([PY, "-c", "print(1)"], env)
    assert not entry_points.can_fork(["torchrun", "-m", "x"], env)
    assert not entry_points.can_fork([PY, "-m", "x"], {**env, "PYTHONPATH": "/elsewhere"})
    assert not entry_points.can_fork([PY, "-m", "x"], {**env, "OMP_NUM_THREADS": "7"})


def test_a_run_past_its_timeout_is_killed(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(Exception) as caught:
        run([PY, str(script)], timeout=2)
    assert type(caught.value).__name__ == "TimeoutExpired"
    assert run([PY, "-m", "clipworld.generate", "--help"]).returncode == 0  # server still serves
