"""Faults of a DomainBed sweep on the generated world, run through DomainBed's own sweep
and train scripts: a train process and then the launcher (with the jobs it runs) are
SIGKILLed mid-job; `sweep delete_incomplete` then `sweep launch` completes every job, and
the collected records equal those of an uninterrupted sweep (same count, no duplicate,
same accuracies: the same seeds give the same records on CPU)."""
import json
import os

import pytest

from tests import faults
from tests.conftest import PY, TINY, job_records, launch_sweep, needs_domainbed, run

pytestmark = [needs_domainbed, faults.needs_proc]

STEPS = 12  # records at step 0 and step 11 (CLIPWorld's CHECKPOINT_FREQ is 100)
HPARAMS = {"clip_model": TINY["clip_model"], "clip_pretrained": TINY["clip_pretrained"],
           "templates": TINY["templates"], "batch_size": 4}
ENV = {"CLIPBENCH_PARALLEL_JOBS": "2", "CLIPBENCH_NUM_WORKERS": "0", "CLIPBENCH_CACHE": "off"}
TIMING = ("step_time", "mem_gb")  # wall-clock and memory: not results


def sweep_args(world, out):
    return ["--datasets", "CLIPWorld", "--algorithms", "CLIPFT",
            "--data_dir", world["domainbed_root"], "--output_dir", str(out),
            "--command_launcher", "local_parallel",
            "--n_hparams", "1", "--n_trials", "1", "--single_test_envs", "--steps", str(STEPS),
            "--hparams", json.dumps(HPARAMS, sort_keys=True), "--skip_confirmation"]


def sweep(command, world, out):
    return [PY, "-m", "domainbed.scripts.sweep", command, *sweep_args(world, out)]


def results(record: dict) -> str:
    """A record without its timing fields and output folder, as comparable text."""
    record = {k: v for k, v in record.items() if k not in TIMING}
    record["args"] = {k: v for k, v in record["args"].items() if k != "output_dir"}
    return json.dumps(record, sort_keys=True)


def collected(sweep_dir) -> list:
    """What DomainBed's collector reads from the sweep (domainbed.lib.reporting)."""
    from domainbed.lib import reporting
    return sorted(results(r) for r in reporting.load_records(str(sweep_dir)))


def jobs(sweep_dir) -> dict:
    return {d.name: d for d in sweep_dir.iterdir() if d.is_dir()}


def done(sweep_dir) -> set:
    return {name for name, d in jobs(sweep_dir).items() if (d / "done").exists()}


@pytest.fixture(scope="module")
def reference(small_world, tmp_path_factory):
    """An uninterrupted sweep: the same 4 CLIPFT jobs (each domain held out once), laid out
    by DomainBed's sweep and run to their end one after the other (conftest.launch_sweep),
    with the torch threads local_parallel gives a job."""
    root = tmp_path_factory.mktemp("reference")
    threads = str(max(1, (os.cpu_count() or 1) // int(ENV["CLIPBENCH_PARALLEL_JOBS"])))
    launched = launch_sweep(sweep_args(small_world, root / "sweep"), root,
                            env={**ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    assert launched.returncode == 0, (launched.stdout + launched.stderr)[-2000:]
    assert len(done(root / "sweep")) == len(jobs(root / "sweep")) == 4
    return root / "sweep"


@pytest.fixture(scope="module")
def faulted(small_world, tmp_path_factory):
    """The same sweep, killed twice, then resumed as the README says."""
    root = tmp_path_factory.mktemp("faulted")
    out = root / "sweep"
    launcher = faults.start(sweep("launch", small_world, out), cwd=root, env=ENV,
                            log=root / "launch.log")
    try:
        def mid_job():  # its first record is written, its `done` is not
            return next((d for d in jobs(out).values() if not (d / "done").exists()
                         and (d / "results.jsonl").is_file()
                         and (d / "results.jsonl").stat().st_size), None) if out.is_dir() else None
        killed = faults.wait_for(mid_job, "a job's first record", proc=launcher)
        faults.kill_descendant(launcher, "domainbed.scripts.train", killed.name)

        def one_done_one_running():
            running = [d for d in jobs(out).values() if d != killed and
                       (d / "out.txt").exists() and not (d / "done").exists()]
            return bool(done(out) and running)
        faults.wait_for(one_done_one_running, "a finished job and a running one", proc=launcher)
    finally:
        faults.kill_group(launcher)  # the launcher and every job it is running
    state = {"killed": killed.name, "done_before": done(out), "all": set(jobs(out)),
             "records_before": {n: (out / n / "results.jsonl").read_bytes()
                                for n in done(out)}}
    deleted = run(sweep("delete_incomplete", small_world, out), cwd=root, env=ENV)
    assert deleted.returncode == 0, deleted.stderr[-2000:]
    state["after_delete"] = set(jobs(out))
    relaunched = run(sweep("launch", small_world, out), cwd=root, env=ENV)
    assert relaunched.returncode == 0, relaunched.stderr[-2000:]
    state["relaunch_stdout"] = relaunched.stdout
    state["sweep"] = out
    return state


def test_a_killed_job_never_has_its_done_file_and_is_deleted(faulted):
    assert faulted["killed"] not in faulted["done_before"]
    assert len(faulted["all"]) == 4  # the sweep makes every job's folder before it runs any
    unfinished = faulted["all"] - faulted["done_before"]
    assert faulted["killed"] in unfinished and len(unfinished) >= 2  # the train kill + the launcher kill
    assert faulted["after_delete"] == faulted["done_before"]  # incomplete ones gone, done ones kept


def test_relaunch_completes_every_job_and_keeps_finished_ones(faulted):
    out = faulted["sweep"]
    assert done(out) == faulted["all"]
    redone = len(faulted["all"]) - len(faulted["done_before"])
    assert f"Launched {redone} jobs" in faulted["relaunch_stdout"]
    for name, before in faulted["records_before"].items():  # untouched by the relaunch
        assert (out / name / "results.jsonl").read_bytes() == before, name
    for d in jobs(out).values():  # one run per job: no duplicated record
        assert [r["step"] for r in job_records(d)] == [0, STEPS - 1], d.name


def test_collected_records_equal_an_uninterrupted_sweep(faulted, reference):
    assert set(jobs(faulted["sweep"])) == set(jobs(reference))  # the same jobs (hash of args)
    got, want = collected(faulted["sweep"]), collected(reference)
    assert len(got) == len(want) == 4 * 2
    assert len(set(got)) == len(got)
    assert got == want


def test_same_seeds_give_the_same_records(faulted, reference):
    """The job that was killed ran twice (killed, then again) beside its reference run:
    its records are the reference's, accuracies and losses, timing aside."""
    name = faulted["killed"]
    again, first = job_records(faulted["sweep"] / name), job_records(reference / name)
    assert [results(r) for r in again] == [results(r) for r in first]
    assert any(k.endswith("_acc") for k in first[-1]) and first[-1]["loss"] > 0
