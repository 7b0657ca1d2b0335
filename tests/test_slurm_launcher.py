"""common/slurm.py and domainbed_adapter/launchers.py: DomainBed's `--command_launcher slurm` and the CoOp protocols'
`--launcher slurm`, through submitit. Slurm is stood in for twice: submitit's local
executor runs the jobs on this machine, and a fake `sbatch` on PATH takes the array (its
script, written by submitit, is checked, and one task is then run as a Slurm node runs it:
`python -m submitit.core._submit` with the SLURM_* variables of an array task)."""
import json
import os
from pathlib import Path

import pytest

from common import env, slurm
from domainbed_adapter import launchers
from sweeps import coop_protocols as cp
from sweeps import demo
from tests.conftest import PY, REPO, TINY, needs_coop, needs_domainbed, run
from tests.test_coop_protocols import openai_clip_dir  # noqa: F401 (fixture)

HPARAMS = {k: TINY[k] for k in ("clip_model", "clip_pretrained")}
TINY_BACKBONE = str(REPO / "trainers" / "configs" / "backbones" / "tiny_vit.yaml")
COOP_TINY = str(REPO / "trainers" / "configs" / "CoOp" / "tiny_vit.yaml")
SWEEP = [PY, "-m", "domainbed.scripts.sweep"]


@pytest.fixture(autouse=True)
def no_slurm_settings(monkeypatch):
    """The caller's CLIPBENCH_SLURM_* must not leak into a test (nor a real Slurm)."""
    for name in (env.SLURM_CONFIG, *env.SLURM.values()):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_slurm(tmp_path):
    """`sbatch` answering as Slurm does, with job ids 4242, 4243, ... (its arguments
    appended to sbatch.calls), and an `srun` (submitit checks that it exists)."""
    bin_dir = tmp_path / "fake_slurm_bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text('#!/bin/sh\nn=$(cat "$0.count" 2>/dev/null || echo 4241)\n'
                      'n=$((n + 1))\necho "$n" > "$0.count"\necho "$@" >> "$0.calls"\n'
                      'echo "Submitted batch job $n"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "calls": sbatch.with_name("sbatch.calls")}


def as_slurm_node(array_id, task):
    """The variables Slurm gives task `task` of array `array_id` (what submitit reads)."""
    return {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": str(int(array_id) + 100 + task),
            "SLURM_ARRAY_JOB_ID": str(array_id), "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "1",
            "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1"}


def jobs_tsv(folder):
    return [line.split("\t") for line in (Path(folder) / "jobs.tsv").read_text().splitlines()]


def sbatch_lines(script):
    return {line for line in Path(script).read_text().splitlines() if line.startswith("#SBATCH")}


# --- options ---------------------------------------------------------------------------

def test_options_come_from_flags_then_variables_then_file(tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_text("partition: big\ntime: 12:00:00\ngpus: 2\nmem: 64G\nwait: yes\n"
                      "sbatch: {account: proj, exclusive: true, requeue: false}\n"
                      "setup: [module load cuda]\n")
    environ = {env.SLURM_CONFIG: str(config), env.SLURM["partition"]: "gpu",
               env.SLURM["time"]: "90", env.SLURM["cpus"]: "8"}
    options = slurm.resolve({"time": "2:00:00"}, environ=environ)
    assert (options.partition, options.time_min, options.gpus, options.cpus) == ("gpu", 120, 2, 8)
    assert options.mem_gb == 64 and options.setup == ["module load cuda"]
    assert options.sbatch == {"account": "proj", "exclusive": True}
    assert options.executor == "slurm" and options.wait and options.parallelism == 256
    environ.pop(env.SLURM["time"])
    assert slurm.resolve(environ=environ).time_min == 720  # the file's 12:00:00, not 43200 s
    default = slurm.resolve(environ={})
    assert (default.partition, default.time_min, default.gpus, default.cpus) == (None, 1440, 1, None)
    assert not default.wait and default.sbatch == {} and default.setup == []
    local = slurm.resolve(environ={env.SLURM["executor"]: "local", env.SLURM["wait"]: "0"})
    assert local.wait  # the local executor always waits
    extra = slurm.resolve(environ={env.SLURM["sbatch"]: "--qos high --mail-type=END --exclusive"})
    assert extra.sbatch == {"qos": "high", "mail_type": "END", "exclusive": True}
    assert [slurm.parse_time(t, "t") for t in ("90", "1:30", "1:00:00", "1-0", "0-00:00:01")] \
        == [90, 2, 60, 1440, 1]
    assert [slurm.parse_mem(m, "m") for m in ("1T", "16", "32GB", "512M")] == [1024, 16, 32, 0.5]


@pytest.mark.parametrize("environ, flags, message", [
    ({"time": "soon"}, {}, "CLIPBENCH_SLURM_TIME='soon': not a time limit "
                           "(minutes, H:MM:SS or D-HH:MM:SS)"),
    ({}, {"gpus": "two"}, "--slurm-gpus='two': not a whole number"),
    ({"array_parallelism": "0"}, {}, "CLIPBENCH_SLURM_ARRAY_PARALLELISM='0': must be at least 1"),
    ({"mem": "lots"}, {}, "CLIPBENCH_SLURM_MEM='lots': not an amount of memory "
                          "(e.g. 32G, 500M; GB when no unit)"),
    ({"sbatch": "-A proj"}, {}, "CLIPBENCH_SLURM_SBATCH='-A proj': '-A' is not a long sbatch "
                                "option (write --account=X, not -A X)"),
    ({"sbatch": "--array=0-9"}, {}, "CLIPBENCH_SLURM_SBATCH='--array=0-9': --array is set by "
                                    "submitit itself"),
    ({"executor": "pbs"}, {}, "CLIPBENCH_SLURM_EXECUTOR='pbs': one of slurm, local"),
    ({"wait": "maybe"}, {}, "CLIPBENCH_SLURM_WAIT='maybe': not a yes/no value (1/0, true/false)"),
])
def test_a_bad_option_is_one_line_naming_it(environ, flags, message):
    with pytest.raises(slurm.SlurmError) as error:
        slurm.resolve(flags, environ={env.SLURM[k]: v for k, v in environ.items()})
    assert str(error.value) == message


def test_a_bad_config_file_is_one_line_naming_file_and_key(tmp_path):
    config = tmp_path / "slurm.yaml"
    for text, message in (("partiton: gpu\n", f"{config}: unknown key 'partiton' (known: "
                                              f"{', '.join(slurm.FIELDS)})"),
                          ("time: never\n", f"{config}: time='never': not a time limit "
                                             "(minutes, H:MM:SS or D-HH:MM:SS)"),
                          ("- gpu\n", f"{config}: expected a mapping of {', '.join(slurm.FIELDS)}")):
        config.write_text(text)
        with pytest.raises(slurm.SlurmError) as error:
            slurm.resolve(environ={env.SLURM_CONFIG: str(config)})
        assert str(error.value) == message
    missing = tmp_path / "none.yaml"
    with pytest.raises(slurm.SlurmError, match=rf"^CLIPBENCH_SLURM_CONFIG file {missing}: cannot "
                                               r"read it \(No such file or directory\)$"):
        slurm.resolve(config=str(missing), environ={})


# --- DomainBed -----------------------------------------------------------------------------

def test_a_failed_job_is_reported_and_keeps_no_done(tmp_path, monkeypatch, capsys):
    """The launcher contract on two stand-in commands: the one that succeeds leaves its
    folder's `done`, the failing one is named with its log and leaves none."""
    monkeypatch.setenv(env.SLURM["executor"], "local")
    monkeypatch.chdir(tmp_path)
    good = ("python -c \"import pathlib, sys; pathlib.Path(sys.argv[2], 'done').write_text('')\" "
            "--output_dir sweep/good")
    bad = "python -c \"import sys; print('boom', file=sys.stderr); sys.exit(3)\" --output_dir sweep/bad"
    for name in ("good", "bad"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
    launchers.slurm_launcher([good, bad])
    out = capsys.readouterr().out
    logs = tmp_path / "sweep" / "slurm_logs"
    assert (tmp_path / "sweep" / "good" / "done").exists()
    assert not (tmp_path / "sweep" / "bad" / "done").exists()
    (bad_id, _, _, bad_err), = [row for row in jobs_tsv(logs) if row[1].endswith("bad")]
    assert f"slurm: {tmp_path / 'sweep' / 'bad'}: failed (RuntimeError: exit status 3); " \
           f"log: {bad_err}" in out
    assert "boom" in Path(bad_err).read_text() and Path(bad_err).parent == logs
    assert "slurm: 1 job(s) finished, 1 failed" in out


@needs_domainbed
def test_domainbed_sweep_runs_with_the_local_executor(small_world, tmp_path):
    out = tmp_path / "sweep"
    args = demo.sweep_args(small_world["domainbed_root"], out, ["ZSCLIP"], HPARAMS, steps=1)
    args[args.index("--command_launcher") + 1] = "slurm"
    variables = {env.SLURM["executor"]: "local", env.SLURM["array_parallelism"]: "2",
                 env.SLURM["time"]: "15"}
    launched = run([*SWEEP, "launch", *args], cwd=tmp_path, env=variables)
    assert launched.returncode == 0, (launched.stdout + launched.stderr)[-3000:]
    assert "slurm: 4 job(s) finished, 0 failed" in launched.stdout
    jobs = sorted(p for p in out.iterdir() if p.is_dir() and p.name != "slurm_logs")
    assert len(jobs) == 4 and all((j / "done").exists() for j in jobs)
    assert json.loads((jobs[0] / "results.jsonl").read_text().splitlines()[-1])["args"][
        "algorithm"] == "ZSCLIP"
    # one log per job beside the job folders, naming the job it ran
    rows = jobs_tsv(out / "slurm_logs")
    assert sorted(Path(row[1]) for row in rows) == jobs
    for job_id, folder, stdout, _ in rows:
        assert f"--output_dir {folder}" in Path(stdout).read_text()
    again = run([*SWEEP, "launch", *args], cwd=tmp_path, env=variables)
    assert again.returncode == 0 and "Launched 0 jobs" in again.stdout
    assert len(jobs_tsv(out / "slurm_logs")) == 4


@needs_domainbed
def test_domainbed_sweep_as_a_slurm_array_then_resumed(small_world, tmp_path, fake_slurm):
    """The array's sbatch script carries every option; a task run as Slurm runs it finishes
    its job; after the rest is lost, delete_incomplete + launch submits only those."""
    out = tmp_path / "sweep"
    args = demo.sweep_args(small_world["domainbed_root"], out, ["ZSCLIP"], HPARAMS, steps=1)
    args[args.index("--command_launcher") + 1] = "slurm"
    variables = {"PATH": fake_slurm["PATH"], env.SLURM["partition"]: "gpu",
                 env.SLURM["time"]: "2:00:00", env.SLURM["gpus"]: "1", env.SLURM["cpus"]: "8",
                 env.SLURM["mem"]: "32G", env.SLURM["array_parallelism"]: "2",
                 env.SLURM["sbatch"]: "--account=proj --qos high --exclusive",
                 env.SLURM["setup"]: "module load cuda"}
    launched = run([*SWEEP, "launch", *args], cwd=tmp_path, env=variables)
    assert launched.returncode == 0, (launched.stdout + launched.stderr)[-3000:]
    logs = out / "slurm_logs"
    assert "slurm: submitted 4 job(s) as array 4242" in launched.stdout
    assert "Launched 4 jobs" in launched.stdout
    assert len(fake_slurm["calls"].read_text().splitlines()) == 1  # one array
    assert sbatch_lines(logs / "4242_submission.sh") >= {
        "#SBATCH --partition=gpu", "#SBATCH --time=120", "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --array=0-3%2",
        "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --exclusive",
        "#SBATCH --job-name=clipbench-domainbed", f"#SBATCH --output={logs}/%A_%a_0_log.out"}
    assert "module load cuda" in (logs / "4242_submission.sh").read_text().splitlines()
    rows = {row[0]: Path(row[1]) for row in jobs_tsv(logs)}
    assert sorted(rows) == [f"4242_{i}" for i in range(4)]
    assert not any((folder / "done").exists() for folder in rows.values())

    node = run([PY, "-m", "submitit.core._submit", str(logs)], cwd=tmp_path,
               env=as_slurm_node(4242, 0))
    assert node.returncode == 0, (node.stdout + node.stderr)[-3000:]
    assert (rows["4242_0"] / "done").exists() and (logs / "4242_0_0_result.pkl").exists()

    # the other three never ran (the array was cancelled): upstream's resume
    deleted = run([*SWEEP, "delete_incomplete", *args], cwd=tmp_path, env=variables)
    assert deleted.returncode == 0 and "Deleted 3 jobs" in deleted.stdout
    again = run([*SWEEP, "launch", *args], cwd=tmp_path, env=variables)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "slurm: submitted 3 job(s) as array 4243" in again.stdout
    assert "#SBATCH --array=0-2%2" in sbatch_lines(logs / "4243_submission.sh")
    resubmitted = {Path(row[1]) for row in jobs_tsv(logs) if row[0].startswith("4243_")}
    assert resubmitted == set(rows.values()) - {rows["4242_0"]}


@pytest.mark.parametrize("variables, message", [
    ({env.SLURM["mem"]: "lots", env.SLURM["executor"]: "local"},
     "CLIPBENCH_SLURM_MEM='lots': not an amount of memory (e.g. 32G, 500M; GB when no unit)"),
    ({"PATH": "empty_bin"},
     "no Slurm here (sbatch/srun not on PATH); CLIPBENCH_SLURM_EXECUTOR=local runs the jobs on "
     "this machine through submitit's local executor"),
])
def test_a_bad_option_or_no_slurm_submits_nothing(variables, message, tmp_path, monkeypatch,
                                                  capsys):
    """One line naming the variable, exit status 2; the (empty) job folders sweep.py made
    are removed again, so the next `launch` submits every job; a folder with output stays."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_bin").mkdir()
    for name, value in variables.items():
        monkeypatch.setenv(name, str(tmp_path / value) if name == "PATH" else value)
    commands = [f"python -m domainbed.scripts.train --output_dir sweep/{name}" for name in "abc"]
    for name in "abc":
        (tmp_path / "sweep" / name).mkdir(parents=True)
    (tmp_path / "sweep" / "c" / "out.txt").write_text("not ours to delete")
    with pytest.raises(SystemExit) as exit_:
        launchers.slurm_launcher(commands)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"slurm launcher: error: {message}\n"
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == ["c"]


# --- CoOp protocols --------------------------------------------------------------------------

@needs_coop
def test_coop_base2new_chain_with_the_local_executor(small_world, openai_clip_dir,  # noqa: F811
                                                     tmp_path):
    """CoOp trained on base then evaluated on new as one task (the evaluation loads the
    epoch the training saved); a rerun submits only what is unfinished."""
    out = tmp_path / "output"
    argv = [PY, "-m", "sweeps.coop_protocols", "base2new", "--trainer", "CoOp", "--config-file",
            COOP_TINY, "--root", small_world["coop_root"], "--output", str(out), "--datasets",
            "oxford_pets", "--seeds", "1", "--openai-clip-dir", str(openai_clip_dir),
            "--no-figures", "--launcher", "slurm", "--slurm-executor", "local"]
    first = run(argv)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert "2 runs: 0 finished (skipped), 2 to run in 1 array task(s)" in first.stdout
    assert "slurm: 1 job(s) finished, 0 failed" in first.stdout
    logs = out / "slurm_logs" / "base2new"
    (job_id, label, stdout, _), = jobs_tsv(logs)
    assert label == "CoOp OxfordPets seed 1 train_base (+1 evaluating it)"
    base = out / "base2new" / "train_base" / "oxford_pets" / "shots_16" / "CoOp" / "tiny_vit" / "seed1"
    new = Path(str(base).replace("train_base", "test_new"))
    assert cp.is_finished(base) and cp.is_finished(new)
    assert "--load-epoch 1" in Path(stdout).read_text()
    assert "Loading weights to prompt_learner" in (new / "log.txt").read_text()
    assert (out / "tables" / "base2new" / "dassl_base2new_OxfordPets.md").is_file()

    trained = (base / "results.json").stat().st_mtime_ns
    (new / "results.json").unlink()
    second = run(argv)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "2 runs: 1 finished (skipped), 1 to run in 1 array task(s)" in second.stdout
    (_, _, stdout, _), = [row for row in jobs_tsv(logs) if row[0] != job_id]
    assert "removing an unfinished run" in Path(stdout).read_text()
    assert cp.is_finished(new) and (base / "results.json").stat().st_mtime_ns == trained


@needs_coop
def test_coop_protocol_as_one_slurm_array(small_world, tmp_path, fake_slurm, monkeypatch, capsys):
    """ZSCLIP over two seeds: four runs, one already finished, three tasks in one array
    with the flags' options; nothing waits and no table is made."""
    out = tmp_path / "output"
    finished = out / "base2new" / "train_base" / "oxford_pets" / "shots_16" / "ZSCLIP" / \
        "tiny_vit" / "seed1"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text(json.dumps({"metrics": {"accuracy": 50.0}}))
    monkeypatch.setenv("PATH", fake_slurm["PATH"])
    monkeypatch.setenv(env.SLURM["gpus"], "4")  # the flag wins
    argv = ["base2new", "--trainer", "ZSCLIP", "--config-file", TINY_BACKBONE, "--root",
            small_world["coop_root"], "--output", str(out), "--datasets", "oxford_pets",
            "--seeds", "1", "2", "--no-figures", "--launcher", "slurm", "--slurm-partition", "a100",
            "--slurm-time", "0-04:00:00", "--slurm-gpus", "1", "--slurm-sbatch=--account=proj"]
    assert cp.main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 runs: 1 finished (skipped), 3 to run in 3 array task(s)" in printed
    assert "slurm: submitted 3 job(s) as array 4242 (clipbench-base2new" in printed
    assert "the same command without --launcher slurm" in printed
    logs = out / "slurm_logs" / "base2new"
    assert sbatch_lines(logs / "4242_submission.sh") >= {
        "#SBATCH --partition=a100", "#SBATCH --time=240", "#SBATCH --gpus-per-node=1",
        "#SBATCH --array=0-2%3", "#SBATCH --account=proj", "#SBATCH --job-name=clipbench-base2new"}
    assert [row[1] for row in jobs_tsv(logs)] == [
        "ZSCLIP OxfordPets seed 1 test_new", "ZSCLIP OxfordPets seed 2 train_base",
        "ZSCLIP OxfordPets seed 2 test_new"]
    assert not (out / "tables").exists()

    assert cp.main([*argv[:-1], "--slurm-time", "abc"]) == 2
    assert capsys.readouterr().err.strip() == \
        "coop_protocols: error: --slurm-time='abc': not a time limit (minutes, H:MM:SS or D-HH:MM:SS)"
    with pytest.raises(SystemExit) as exit_:
        cp.main(["base2new", "--trainer", "ZSCLIP", "--root", "data", "--slurm-partition", "gpu"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --slurm-partition: only with --launcher slurm")
