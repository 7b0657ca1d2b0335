"""Strict readers of result records: a record file is whole, or it is damaged at one line.

A damaged file is never read for part of its records: the caller leaves the whole job
(or run) out and reports it as incomplete, naming the file and the line
(`Damage`). What counts as damage:
- a line that is not UTF-8 text, not JSON (truncated by a kill, half-written, garbage),
  or JSON that is not a record of the kind (the kind's `check` says why);
- for a finished DomainBed job (`done`): no record at all, a record of another job, a
  step that does not follow the one before (a doubled or reordered record), or a last
  record before the job's last step (records cut off at a line boundary).
Blank lines carry nothing and are skipped.

Used by the harness's collector (results/kind_domainbed.py, results/kind_dassl.py), by
DomainBed's own `collect_results` run through the harness (domainbed_adapter/patches.py)
and by the domain-gap analysis (evaluation/domain_gap.py), so all leave out the same jobs.
A low module: it imports nothing of the harness above common/.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np


@dataclass(frozen=True)
class Damage:
    path: Path
    line: Optional[int]  # 1-based; None: the file as a whole
    reason: str

    def where(self, short: bool = False) -> str:
        """`<path>:<line>`; short: `<job folder>/<file>:<line>` (for table notes)."""
        path = Path(self.path)
        name = f"{path.parent.name}/{path.name}" if short else str(path)
        return name if self.line is None else f"{name}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where()}: {self.reason}"


def read_jsonl(path, check: Callable[[object], Optional[str]] | None = None):
    """(records, damage): every record of a JSON-lines file and None, or the records
    before the first damaged line and its `Damage`. `check(record)` returns why a parsed
    record is not one of its kind (None: it is)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        return [], Damage(path, None, f"cannot be read ({e.strerror or e})")
    records, lines = [], data.split(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return records, Damage(path, line_no, "not UTF-8 text (a corrupt record)")
        except (ValueError, RecursionError):
            cut = line_no == len(lines)  # the file ends inside this line
            return records, Damage(path, line_no, "truncated record (the file ends inside it)"
                                   if cut else "corrupt record (not JSON)")
        reason = check(record) if check else None
        if reason:
            return records, Damage(path, line_no, reason)
        records.append(record)
    return records, None


def read_json(path, check: Callable[[object], Optional[str]] | None = None):
    """(record, damage) of a one-record JSON file; the damage names the line where
    parsing stopped."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        return None, Damage(path, None, f"cannot be read ({e.strerror or e})")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        return None, Damage(path, line, "not UTF-8 text (a corrupt record)")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, Damage(path, e.lineno, f"truncated or corrupt record ({e.msg})")
    except (ValueError, RecursionError) as e:  # a number too long, nesting too deep
        return None, Damage(path, None, f"corrupt record ({type(e).__name__})")
    reason = check(record) if check else None
    return (None, Damage(path, None, reason)) if reason else (record, None)


# --- DomainBed: one results.jsonl per job ----------------------------------------------

JOB_ARGS = {"algorithm": str, "dataset": str, "test_envs": list, "hparams_seed": int,
            "trial_seed": int}
ACCURACY = re.compile(r"env(\d+)_(in|out|uda)_acc")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fraction(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= 1)


def domainbed_problem(record) -> Optional[str]:
    """Why `record` is not a DomainBed checkpoint record that model selection can use
    (None: it is)."""
    if not isinstance(record, dict):
        return f"not a record (a JSON {type(record).__name__})"
    args = record.get("args")
    missing = [k for k in JOB_ARGS if not isinstance(args, dict) or k not in args]
    missing += [k for k in ("step", "env0_in_acc", "env0_out_acc") if k not in record]
    if missing:
        return f"a record without {', '.join(missing)}"
    for key, kind in JOB_ARGS.items():
        value = args[key]
        if not (_integer(value) if kind is int else isinstance(value, kind)):
            return f"a record whose args.{key} is {value!r}"
    if not _integer(record["step"]) or record["step"] < 0:
        return f"a record whose step is {record['step']!r}"
    envs = {"in": set(), "out": set()}
    for key, value in record.items():
        m = ACCURACY.fullmatch(key)
        if m:
            if not _fraction(value):
                return f"a record whose {key} is {value!r}"
            envs.setdefault(m.group(2), set()).add(int(m.group(1)))
    n = len(envs["in"])
    if envs["in"] != set(range(n)) or envs["out"] != envs["in"]:
        return "a record whose env*_in_acc / env*_out_acc do not cover the same environments"
    test_envs = args["test_envs"]
    if not test_envs or not all(_integer(t) and 0 <= t < n for t in test_envs):
        return f"a record whose test_envs {test_envs!r} are not among its {n} environments"
    return None


def job_key(record) -> tuple:
    args = record["args"]
    return tuple(json.dumps(args[k], sort_keys=True) for k in JOB_ARGS)


def read_domainbed_job(job, finished: bool):
    """(records, damage) of a DomainBed job folder; damage None when the job's records
    are whole. A finished job (`done`) must also hold its last step's record."""
    path = Path(job) / "results.jsonl"
    if not path.is_file():
        return [], (Damage(path, None, "missing, although the job finished (`done`)")
                    if finished else None)
    records, damage = read_jsonl(path, domainbed_problem)
    if damage is None:
        damage = _job_problem(path, records, finished)
    return records, damage


def _job_problem(path, records, finished) -> Optional[Damage]:
    lines = [n for n, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1)
             if raw.strip()]
    for i in range(1, len(records)):
        if job_key(records[i]) != job_key(records[0]):
            return Damage(path, lines[i], "a record of another job (its args differ)")
        if records[i]["step"] <= records[i - 1]["step"]:
            return Damage(path, lines[i], f"step {records[i]['step']} after step "
                          f"{records[i - 1]['step']} (a doubled or reordered record)")
    if not finished:
        return None
    if not records:
        return Damage(path, None, "no record, although the job finished (`done`)")
    last, steps = records[-1], last_step(records[-1])
    if steps is not None and last["step"] != steps:
        return Damage(path, (lines[-1] if lines else 0) + 1,
                      f"records end at step {last['step']}, the job's last step is {steps} "
                      "(records cut off)")
    return None


def dataset_of(job) -> str:
    """The dataset named by any readable record of a job ("?" when none names one): a
    damaged job's table notes go under its dataset's tables."""
    try:
        lines = (Path(job) / "results.jsonl").read_bytes().split(b"\n")
    except OSError:
        return "?"
    for raw in lines:
        try:
            args = json.loads(raw.decode("utf-8")).get("args")
            if isinstance(args, dict) and isinstance(args.get("dataset"), str):
                return args["dataset"]
        except (ValueError, RecursionError, AttributeError):
            continue
    return "?"


def last_step(record) -> Optional[int]:
    """The last step of the job that wrote `record`, from its fields: the run facts'
    `steps` (the harness's algorithms, common/run_facts.py), else train.py's --steps,
    else the dataset class's N_STEPS (upstream's algorithms; read from the imported
    `domainbed.datasets`, which registers the harness's datasets too), minus one; None
    when unknown."""
    facts = record.get("hparams", {}).get("run") if isinstance(record.get("hparams"), dict) else None
    steps = facts.get("steps") if isinstance(facts, dict) else None
    if steps is None:
        steps = record["args"].get("steps")
    if steps is None:
        steps = dataset_steps(record["args"]["dataset"])
    return steps - 1 if _integer(steps) and steps > 0 else None


def dataset_steps(dataset: str) -> Optional[int]:
    """N_STEPS of a DomainBed dataset class (None: no such class, or DomainBed missing)."""
    datasets = upstream_datasets()
    return getattr(getattr(datasets, dataset, None), "N_STEPS", None) if datasets else None


def dataset_environments(dataset: str) -> Optional[list]:
    """ENVIRONMENTS of a DomainBed dataset class, in env index order (None: unknown)."""
    datasets = upstream_datasets()
    names = getattr(getattr(datasets, dataset, None), "ENVIRONMENTS", None) if datasets else None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def upstream_datasets():
    """The `domainbed.datasets` module (imported once: it loads torchvision), or None
    when DomainBed is not importable. Only records without run facts need it."""
    try:
        import domainbed.datasets as datasets
    except ImportError:
        return None
    return datasets


def in_domain_accuracy(record) -> Optional[float]:
    """Mean accuracy on the training domains' held-out images (their `env<i>_out_acc`,
    what training-domain validation selects on); None when the record has none."""
    test_envs = set(record["args"]["test_envs"])
    held_out = [v for k, v in record.items() if (m := ACCURACY.fullmatch(k))
                and m.group(2) == "out" and int(m.group(1)) not in test_envs]
    return float(np.mean(held_out)) if held_out else None


# --- WiSE-FT's records (evaluation/wise_ft.py): one per alpha --------------------------

def wise_ft_alpha(record):
    """The alpha of a WiSE-FT record (its job names a source algorithm), else None."""
    if not record["args"].get("source_algorithm"):
        return None
    return record["hparams"].get("alpha")


def alpha_runs(records) -> list:
    """Each WiSE-FT record a run of its own (hparams_seed `<seed>@alpha=<alpha>`): upstream's
    selection then picks alpha as it picks hyperparameters; the oracle, which reads each
    run's last record, picks the alpha best on test-domain validation (not alpha 1)."""
    def one(r):
        alpha = wise_ft_alpha(r)
        if alpha is None:
            return r
        return {**r, "args": {**r["args"],
                              "hparams_seed": f"{r['args']['hparams_seed']}@alpha={alpha}"}}
    return [one(r) for r in records]
