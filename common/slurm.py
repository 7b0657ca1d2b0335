r"""Slurm job arrays through submitit, for DomainBed's sweep (`--command_launcher slurm`,
domainbed_adapter/launchers.py) and the CoOp protocols (`python -m sweeps.coop_protocols ...
--launcher slurm`).

Options, each from (first wins) a `--slurm-*` flag (the CoOp protocols only: DomainBed's
sweep parser is upstream's), a CLIPBENCH_SLURM_* variable, the YAML file named by
--slurm-config / CLIPBENCH_SLURM_CONFIG (keys as below), the default:

    partition          Slurm partition                         (default: the cluster's)
    time               per job: minutes, H:MM:SS or D-HH:MM:SS (default 24:00:00)
    gpus               GPUs per job                            (default 1; 0 = none asked)
    cpus               CPUs per job                            (default: the cluster's)
    mem                memory per job: 32G, 500M, 1T; GB when no unit (default: the cluster's)
    array_parallelism  tasks of the array running at once      (default 256, submitit's;
                       local executor: CLIPBENCH_PARALLEL_JOBS or the cores)
    sbatch             more sbatch options: "--account=X --qos=high --exclusive"
                       (a mapping in the YAML file)
    setup              shell lines run before each job: "module load cuda/12.1"
    executor           slurm | local (submitit's local executor: the jobs run on this
                       machine; for tests and small checks)
    wait               wait for the jobs and report each failure (default: no on Slurm:
                       submit and return; the local executor always waits)

Logs: submitit's folder (`<id>_<task>_log.out` / `.err`, the pickled call and result) plus
`jobs.tsv` (job id, what it runs, its logs), beside the runs' folders.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import env

FIELDS = ("partition", "time", "gpus", "cpus", "mem", "array_parallelism", "sbatch", "setup",
          "executor", "wait")
EXECUTORS = ("slurm", "local")
DEFAULT_TIME = "24:00:00"
# sbatch options submitit writes itself: an override would break the array or its logs
MANAGED = {"array", "output", "error", "open_mode", "wrap", "signal"}
POLL_S = {"slurm": 30.0, "local": 0.5}


class SlurmError(ValueError):
    """A bad option or a failed submission: one line naming what and where."""


@dataclass
class Options:
    partition: str | None = None
    time_min: int = 24 * 60
    gpus: int = 1
    cpus: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    sbatch: dict = field(default_factory=dict)
    setup: list = field(default_factory=list)
    executor: str = "slurm"
    wait: bool = False

    @property
    def parallelism(self) -> int:
        if self.array_parallelism is not None:
            return self.array_parallelism
        return env.parallel_jobs() if self.executor == "local" else 256


# --- parsing: every value says where it came from ---------------------------------------

def _bad(where, value, expected) -> SlurmError:
    return SlurmError(f"{where}={value!r}: {expected}")


def parse_time(value, where) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes."""
    text = str(value).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise _bad(where, value, "not a time limit (minutes, H:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise _bad(where, value, "a time limit must be positive")
    return math.ceil(seconds / 60)


def parse_mem(value, where) -> float:
    """32G, 32GB, 500M, 1T, 16 (GB) as GB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", str(value).strip(), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise _bad(where, value, "not an amount of memory (e.g. 32G, 500M; GB when no unit)")
    scale = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1, "T": 1024, "": 1}[match.group(2).upper()]
    return float(match.group(1)) * scale


def parse_int(value, where, minimum) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise _bad(where, value, "not a whole number") from None
    if number < minimum:
        raise _bad(where, value, f"must be at least {minimum}")
    return number


def parse_bool(value, where) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise _bad(where, value, "not a yes/no value (1/0, true/false)")


def parse_sbatch(value, where) -> dict:
    """Extra sbatch options, "--account=X --qos high --exclusive" (or a mapping), as
    submitit's additional parameters (keys with underscores; True = a bare flag)."""
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    else:
        tokens, items = shlex.split(str(value)), []
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if not token.startswith("--") or len(token) < 3:
                raise _bad(where, value, f"{token!r} is not a long sbatch option "
                                         "(write --account=X, not -A X)")
            if "=" in token:
                key, item = token[2:].split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                key, item = token[2:], tokens[i + 1]
                i += 1
            else:
                key, item = token[2:], True
            items.append((key, item))
            i += 1
    options = {}
    for key, item in items:
        if isinstance(value, dict) and str(item).lower() in ("true", "false"):
            if str(item).lower() == "false":
                continue
            item = True  # a bare flag: {exclusive: true}
        key = key.lstrip("-").replace("-", "_")
        if key in MANAGED:
            raise _bad(where, value, f"--{key.replace('_', '-')} is set by submitit itself")
        options[key] = True if item is True else str(item)
    return options


def parse_setup(value, where) -> list:
    if isinstance(value, (list, tuple)):
        if not all(isinstance(line, str) for line in value):
            raise _bad(where, value, "setup: a list of shell lines")
        return list(value)
    return [str(value)] if str(value).strip() else []


def parse_executor(value, where) -> str:
    text = str(value).strip().lower()
    if text not in EXECUTORS:
        raise _bad(where, value, f"one of {', '.join(EXECUTORS)}")
    return text


def read_config(path) -> dict:
    """The YAML (or JSON) file of options: {key: value}, keys as FIELDS. Every scalar is
    read as text (YAML's own typing would turn `time: 12:00:00` into 43200) and parsed as
    the variables are."""
    import yaml
    path = Path(path).expanduser()
    try:
        with open(path) as f:
            config = yaml.load(f, Loader=yaml.BaseLoader) or {}
    except OSError as e:
        raise SlurmError(f"{env.SLURM_CONFIG} file {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SlurmError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise SlurmError(f"{path}: expected a mapping of {', '.join(FIELDS)}")
    unknown = sorted(set(map(str, config)) - set(FIELDS))
    if unknown:
        raise SlurmError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(FIELDS)})")
    return config


def resolve(flags: dict | None = None, flag_names: dict | None = None,
            config: str | None = None, environ=None) -> Options:
    """Options from flags (field -> value, None = not given), then CLIPBENCH_SLURM_*,
    then the config file, then the defaults. Raises SlurmError naming the source."""
    environ = os.environ if environ is None else environ
    flags, flag_names = flags or {}, flag_names or {}
    config_path = config or environ.get(env.SLURM_CONFIG) or None
    file_values = read_config(config_path) if config_path else {}
    raw = {}
    for name in FIELDS:
        if flags.get(name) is not None:
            raw[name] = (flags[name], flag_names.get(name, f"--slurm-{name.replace('_', '-')}"))
        elif (environ.get(env.SLURM[name]) or "").strip():
            raw[name] = (environ[env.SLURM[name]], env.SLURM[name])
        elif file_values.get(name) is not None:
            raw[name] = (file_values[name], f"{Path(config_path).expanduser()}: {name}")
    options = Options()
    if "partition" in raw:
        options.partition = str(raw["partition"][0]).strip()
    options.time_min = parse_time(*raw.get("time", (DEFAULT_TIME, "default time")))
    if "gpus" in raw:
        options.gpus = parse_int(*raw["gpus"], minimum=0)
    if "cpus" in raw:
        options.cpus = parse_int(*raw["cpus"], minimum=1)
    if "mem" in raw:
        options.mem_gb = parse_mem(*raw["mem"])
    if "array_parallelism" in raw:
        options.array_parallelism = parse_int(*raw["array_parallelism"], minimum=1)
    if "sbatch" in raw:
        options.sbatch = parse_sbatch(*raw["sbatch"])
    if "setup" in raw:
        options.setup = parse_setup(*raw["setup"])
    if "executor" in raw:
        options.executor = parse_executor(*raw["executor"])
    if "wait" in raw:
        options.wait = parse_bool(*raw["wait"])
    if options.executor == "local":
        options.wait = True
    return options


# --- command-line flags (the CoOp protocols; reusable by any argparse front end) -------

def add_arguments(parser) -> None:
    group = parser.add_argument_group(
        "Slurm (--launcher slurm)",
        f"each flag overrides its variable ({env.SLURM['partition']}, ...), which overrides "
        f"the file named by --slurm-config / {env.SLURM_CONFIG}")
    group.add_argument("--slurm-partition", metavar="NAME")
    group.add_argument("--slurm-time", metavar="LIMIT",
                       help=f"per job: minutes, H:MM:SS or D-HH:MM:SS (default {DEFAULT_TIME})")
    group.add_argument("--slurm-gpus", metavar="N", help="GPUs per job (default 1)")
    group.add_argument("--slurm-cpus", metavar="N", help="CPUs per job")
    group.add_argument("--slurm-mem", metavar="SIZE", help="memory per job: 32G, 500M")
    group.add_argument("--slurm-array-parallelism", metavar="N",
                       help="array tasks running at once")
    group.add_argument("--slurm-sbatch", metavar="OPTIONS",
                       help='more sbatch options, with =: --slurm-sbatch="--account=X --qos=high"')
    group.add_argument("--slurm-setup", metavar="LINE", help="shell line run before each job")
    group.add_argument("--slurm-executor", metavar="KIND",
                       help="slurm (default) or local: submitit's local executor")
    group.add_argument("--slurm-wait", action=argparse.BooleanOptionalAction, default=None,
                       help="wait for the array and report (default: submit and return)")
    group.add_argument("--slurm-config", metavar="FILE", help="YAML file of these options")


def given_flags(args) -> list[str]:
    return [f"--slurm-{name.replace('_', '-')}" for name in (*FIELDS, "config")
            if getattr(args, f"slurm_{name}", None) is not None]


def options_from_args(args) -> Options:
    return resolve({name: getattr(args, f"slurm_{name}", None) for name in FIELDS},
                   config=getattr(args, "slurm_config", None))


# --- submitting ---------------------------------------------------------------------------

def _executor(options: Options, folder: Path, name: str):
    try:
        import submitit
    except ImportError:
        raise SlurmError("submitit is not installed (pip install 'submitit>=1.5')") from None
    if options.executor == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise SlurmError(f"no Slurm here (sbatch/srun not on PATH); {env.SLURM['executor']}=local "
                         "runs the jobs on this machine through submitit's local executor")
    executor = submitit.AutoExecutor(folder=folder, cluster=options.executor)
    params = {"name": name, "timeout_min": options.time_min,
              "gpus_per_node": options.gpus or None, "cpus_per_task": options.cpus,
              "mem_gb": options.mem_gb}
    if options.executor == "slurm":
        params.update(slurm_partition=options.partition or None,
                      slurm_array_parallelism=options.parallelism,
                      slurm_additional_parameters=dict(options.sbatch) or None,
                      slurm_setup=list(options.setup) or None)
    else:
        params.update(local_setup=list(options.setup) or None)
    executor.update_parameters(**params)
    return executor


@dataclass
class Outcome:
    submitted: int = 0
    finished: int = 0
    failed: list = field(default_factory=list)  # (label, reason, log)
    job_ids: list = field(default_factory=list)


def _reason(job) -> str | None:
    """None when the job succeeded, else the last line of what went wrong."""
    try:
        error = job.exception()
    except Exception as e:  # noqa: BLE001 - submitit's errors when no result was written
        error = e
    if error is None:
        return None
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    raised = [line for line in lines  # the exception a failed job's trace ends with
              if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)]
    return (raised or lines or [type(error).__name__])[-1 if raised else 0]


def _record(folder: Path, jobs, labels) -> None:
    with open(folder / "jobs.tsv", "a") as f:
        for job, label in zip(jobs, labels):
            f.write(f"{job.job_id}\t{label}\t{job.paths.stdout}\t{job.paths.stderr}\n")


def submit(fn, calls: list, labels: list, options: Options, folder, name: str,
           log=print) -> Outcome:
    """Runs fn(*call) for every call as one job array (Slurm) or as local jobs, at most
    options.parallelism at once. Waits when options.wait and reports every failure."""
    folder, outcome = Path(folder).resolve(), Outcome()
    if not calls:
        return outcome
    executor = _executor(options, folder, name)  # checks before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    if options.executor == "slurm":
        try:
            jobs = executor.map_array(fn, *zip(*calls))
        except Exception as e:  # noqa: BLE001 - sbatch's refusal, in one line
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            why = lines[-1].strip() if lines else str(e.__cause__ or type(e).__name__)
            raise SlurmError(f"sbatch refused the array: {why}") from None
        _record(folder, jobs, labels)
        outcome.submitted, outcome.job_ids = len(jobs), [j.job_id for j in jobs]
        array = jobs[0].job_id.split("_")[0]
        log(f"slurm: submitted {len(jobs)} job(s) as array {array} ({name}, at most "
            f"{min(options.parallelism, len(jobs))} at once); logs in {folder}", flush=True)
        if options.wait:
            _wait(jobs, labels, outcome, POLL_S["slurm"], log)
        else:
            log(f"slurm: not waiting; follow with: squeue --name {name}, sacct -j {array}",
                flush=True)
        return outcome
    # the local executor runs one process per job: a window of `parallelism` at a time
    pending, running = list(zip(calls, labels)), []
    log(f"slurm: running {len(pending)} job(s) with submitit's local executor, "
        f"{options.parallelism} at once; logs in {folder}", flush=True)
    while pending or running:
        while pending and len(running) < options.parallelism:
            call, label = pending.pop(0)
            job = executor.submit(fn, *call)
            _record(folder, [job], [label])
            outcome.job_ids.append(job.job_id)
            outcome.submitted += 1
            running.append((job, label))
        done = [(job, label) for job, label in running if job.done()]
        for job, label in done:
            running.remove((job, label))
            _report(job, label, outcome, log)
        if running:
            time.sleep(POLL_S["local"])
    _summary(outcome, folder, log)
    return outcome


def _report(job, label, outcome, log) -> None:
    reason = _reason(job)
    if reason is None:
        outcome.finished += 1
    else:
        outcome.failed.append((label, reason, job.paths.stderr))
        log(f"slurm: {label}: failed ({reason}); log: {job.paths.stderr}", flush=True)


def _summary(outcome, folder, log) -> None:
    log(f"slurm: {outcome.finished} job(s) finished, {len(outcome.failed)} failed "
        f"(logs in {folder})", flush=True)


def _wait(jobs, labels, outcome, poll, log) -> None:
    remaining = list(zip(jobs, labels))
    while remaining:
        for job, label in [(j, l) for j, l in remaining if j.done()]:
            remaining.remove((job, label))
            _report(job, label, outcome, log)
        if remaining:
            time.sleep(poll)
    _summary(outcome, jobs[0].paths.folder, log)


# --- what runs inside a job -----------------------------------------------------------------

def run_shell(command: str, cwd: str) -> int:
    """One shell command (a DomainBed job) inside a Slurm/local job; a non-zero exit
    fails the job, so submitit records it as failed."""
    print(f"[clipbench] cwd {cwd}\n[clipbench] $ {command}", flush=True)
    code = subprocess.call(command, shell=True, cwd=cwd)
    if code:
        raise RuntimeError(f"exit status {code}")
    return 0
