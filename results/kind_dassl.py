"""Dassl/CoOp runs: `<run dir>/results.json` written by trainers/dassl_adapter.py
({"kind": "dassl", "trainer", "dataset", "subsample_classes", "num_shots", "seed",
"split", "num_classes", "metrics": {"accuracy", ...}, "run": {...}}, accuracy in %).

Where a run goes is read from its run facts ("run", common/run_facts.py), never guessed
from folders or dataset names:
- protocol base2new (stage base / new) -> the base-to-new tables;
- protocol cross_dataset / domain_generalization, stage target -> the cross-dataset / DG
  table; stage source (the ImageNet model both evaluate) -> their source column (of the
  all-classes table when there are no cross-dataset or DG targets);
- protocol dassl (a plain train_coop.py run, stage test): subsample_classes base or new ->
  the base-to-new tables, all classes -> the all-classes table (trained and tested on
  one dataset).
A record without valid run facts (written before they were recorded) is left out as
incomplete, like a damaged one. Rows never pool runs that differ in backbone or
precision (the run facts'): with one setting each table names it in a note, with several
each row does.

Tables: per dataset Base / New / HM and their average over datasets (CoCoOp Table 1),
cross-dataset and DG (rows trainers, columns datasets); the all-classes table gets the
published zero-shot rows (protocol calip_zeroshot, results/reference/). Cells are mean ±
std over seeds (population std, as CoOp's parse_test_res.py); HM is the harmonic mean of the mean
base and mean new accuracy, and the average row's HM that of the averaged base and new
(as the published tables). Rows are trainers (a trainer's runs with several shot
counts are pooled, with a note). Only `split == "test"` results are tabulated. A run
folder with a Dassl log but no results.json is counted as unfinished; one whose
results.json is damaged (truncated, corrupt, a dassl record without the fields above:
common/records.py) is left out as incomplete, never scored, and named (file and line)
in a warning and in the notes of every Dassl table.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from common.records import Damage, read_json
from common.run_facts import check_facts
from results import reference
from results.kinds import Kind, register
from results.tables import Cell, Table, harmonic_mean, mean_std, setting_note

IMAGENET = "ImageNet"
DG_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
# CoOp's DATASET.NAME of the 11 datasets, in the published tables' order
BASE2NEW = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101",
            "FGVCAircraft", "SUN397", "DescribableTextures", "EuroSAT", "UCF101")
PROTOCOLS = ("base2new", "xd", "dg", "fewshot", "source")  # where a run is tabulated
# (run facts' protocol, stage) -> where; None: by subsample_classes (see the docstring)
PLACES = {("base2new", "base"): "base2new", ("base2new", "new"): "base2new",
          ("cross_dataset", "source"): "source", ("cross_dataset", "target"): "xd",
          ("domain_generalization", "source"): "source",
          ("domain_generalization", "target"): "dg", ("dassl", "test"): None}
REQUIRED = ("trainer", "dataset", "subsample_classes", "seed", "metrics")


@dataclass(frozen=True)
class Run:
    trainer: str
    dataset: str
    subsample: str  # all | base | new
    shots: int
    seed: int
    protocol: str
    accuracy: float
    path: str
    backbone: str = ""
    precision: str = ""
    method: str = ""  # the trainer's name (published rows match it); `trainer` is the row


@dataclass
class Runs:
    runs: list[Run] = field(default_factory=list)
    unfinished: int = 0
    other_splits: int = 0
    damaged: list[Damage] = field(default_factory=list)  # runs left out as incomplete

    def __bool__(self):
        return bool(self.runs)


# --- loading ------------------------------------------------------------------------

def protocol_of(record) -> str:
    """Where a run is tabulated (one of PROTOCOLS), from its run facts."""
    place = PLACES[record["run"]["protocol"], record["run"]["stage"]]
    if place is None:
        return "base2new" if record["subsample_classes"] in ("base", "new") else "fewshot"
    return place


def facts_problem(record) -> str | None:
    """Why a dassl record's run facts cannot place it (None: they can)."""
    try:
        facts = check_facts(record.get("run"), "run")
    except ValueError as e:
        return f"{e} (a record written before they were recorded?)"
    if (facts["protocol"], facts["stage"]) not in PLACES:
        return f"run facts of protocol {facts['protocol']!r}, stage {facts['stage']!r}"
    if not facts["backbone"] or not facts["precision"]:
        return "run facts without backbone or precision"
    return None


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def run_problem(record) -> str | None:
    """Why a dassl record cannot be tabulated (None: it can)."""
    missing = [k for k in REQUIRED if k not in record]
    metrics = record.get("metrics")
    if not missing and not (isinstance(metrics, dict) and "accuracy" in metrics):
        missing.append("metrics.accuracy")
    if missing:
        return f"a dassl record without {', '.join(missing)}"
    bad = [k for k in ("trainer", "dataset", "subsample_classes") if not isinstance(record[k], str)]
    bad += [] if _integer(record["seed"]) else ["seed"]
    bad += [] if record.get("num_shots") is None or _integer(record["num_shots"]) else ["num_shots"]
    accuracy = metrics["accuracy"]
    if not (isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool)
            and math.isfinite(accuracy) and 0 <= accuracy <= 100):
        bad.append("metrics.accuracy")
    if bad:
        return f"a dassl record with an invalid {', '.join(bad)}"
    return facts_problem(record)


def to_run(record, path) -> Run:
    return Run(record["trainer"], record["dataset"], record["subsample_classes"],
               int(record.get("num_shots") or -1), int(record["seed"]), protocol_of(record),
               float(record["metrics"]["accuracy"]), str(path), str(record["run"]["backbone"]),
               str(record["run"]["precision"]), record["trainer"])


def load_runs(paths) -> Runs:
    runs, seen = Runs(), {}
    json_dirs = {Path(p).parent for p in paths if Path(p).name == "results.json"}
    log_dirs = {Path(p).parent for p in paths if Path(p).name.startswith("log.txt")}
    runs.unfinished = len(log_dirs - json_dirs)
    for path in (p for p in paths if Path(p).name == "results.json"):
        record, damage = read_json(path)
        if damage is None and not isinstance(record, dict):
            record, damage = None, Damage(Path(path), None, "not a record (a JSON "
                                          f"{type(record).__name__})")
        in_run = Path(path).parent in log_dirs  # a Dassl run folder: its results.json is ours
        if damage is None and record.get("kind") != "dassl":
            if not in_run:
                continue  # another kind's results.json
            record, damage = None, Damage(Path(path), None, "not a dassl record (kind "
                                          f"{record.get('kind')!r})")
        if damage is None and record.get("split", "test") != "test":
            runs.other_splits += 1
            continue
        if damage is None and run_problem(record):
            damage = Damage(Path(path), None, run_problem(record))
        if damage is not None:
            if in_run or record is not None:  # a Dassl run's record
                runs.damaged.append(damage)
                warnings.warn(f"{damage}: Dassl run left out as incomplete")
            else:
                warnings.warn(f"{damage}: skipped (no Dassl log beside it)")
            continue
        run = to_run(record, path)
        key = (run.trainer, run.dataset, run.subsample, run.shots, run.seed, run.protocol,
               run.backbone, run.precision)
        if key in seen:
            warnings.warn(f"{path}: same run as {seen[key]}; keeping the first")
            continue
        seen[key] = path
        runs.runs.append(run)
    return runs


def by_setting(runs) -> list[Run]:
    """With several (backbone, precision) settings among `runs`, each run's row becomes
    `<trainer> (<backbone>, <precision>)`: no cell pools two settings."""
    if len({(r.backbone, r.precision) for r in runs}) <= 1:
        return list(runs)
    return [dataclasses.replace(r, trainer=f"{r.method} ({r.backbone}, {r.precision})")
            for r in runs]


def method_of(runs) -> dict:
    """Row label -> trainer name (the key published rows match)."""
    return {r.trainer: r.method or r.trainer for r in runs}


# --- tables -------------------------------------------------------------------------

def shot_notes(runs) -> list[str]:
    """Rows are trainers; say so when a trainer's training runs used several shot counts
    (evaluation-only runs, such as new-class or target-dataset tests, are not counted)."""
    shots = collections.defaultdict(set)
    for r in runs:
        if r.subsample in ("all", "base") and r.protocol in ("base2new", "source", "fewshot"):
            shots[r.trainer].add(r.shots)
    return [f"{trainer}: runs with {', '.join(map(str, sorted(s)))} shots pooled."
            for trainer, s in sorted(shots.items()) if len(s) > 1]


def seed_cell(runs) -> Cell:
    mean, std = mean_std([r.accuracy for r in runs])
    return Cell(mean, std, n=len(runs))


def dataset_order(datasets, first=BASE2NEW) -> list[str]:
    return [d for d in first if d in datasets] + sorted(set(datasets) - set(first))


def base2new_tables(runs, refs, notes) -> list[Table]:
    notes = notes + shot_notes(runs)
    # (trainer, dataset) -> subsample -> runs
    per = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in runs:
        per[r.trainer, r.dataset][r.subsample].append(r)
    trainers, keys = sorted({r.trainer for r in runs}), method_of(runs)
    tables, means = [], collections.defaultdict(dict)  # trainer -> dataset -> (base, new)
    for dataset in dataset_order({r.dataset for r in runs}):
        table = Table(f"dassl_base2new_{dataset}", f"Base-to-new: {dataset}",
                      ["Base", "New", "HM"], digits=2, figure_column="HM", notes=list(notes))
        for trainer in trainers:
            subs = per.get((trainer, dataset))
            if not subs:
                continue
            base, new = seed_cell(subs["base"]), seed_cell(subs["new"])
            table.add(trainer, [base, new, Cell(harmonic_mean(base.mean, new.mean))],
                      key=keys[trainer])
            if base.mean is not None and new.mean is not None:
                means[trainer][dataset] = (base.mean, new.mean)
        reference.attach(table, reference.select(refs, dataset=dataset),
                         lambda ref: {"base": "Base", "new": "New", "hm": "HM"}.get(ref.metric))
        tables.append(table)
    tables.append(base2new_average(means, refs, notes, keys))
    return tables


def base2new_average(means, refs, notes, keys) -> Table:
    table = Table("dassl_base2new_average", "Base-to-new: average over datasets",
                  ["Base", "New", "HM"], digits=2, figure_column="HM",
                  notes=[*notes, "Average over the datasets where a method has both base and new "
                         "(their number in brackets when not all of the published "
                         f"{len(BASE2NEW)}); deltas only for methods with all of them."])
    for trainer in sorted(means):
        pairs = list(means[trainer].values())
        base = sum(b for b, _ in pairs) / len(pairs)
        new = sum(n for _, n in pairs) / len(pairs)
        complete = set(BASE2NEW) <= set(means[trainer])
        label = trainer if complete else f"{trainer} ({len(pairs)} datasets)"
        table.add(label, [Cell(base, n=len(pairs)), Cell(new, n=len(pairs)),
                          Cell(harmonic_mean(base, new))], key=keys[trainer] if complete else None)
    reference.attach(table, reference.select(refs, dataset="Average"),
                     lambda ref: {"base": "Base", "new": "New", "hm": "HM"}.get(ref.metric))
    return table


def transfer_table(name, title, runs, refs, notes,
                   average_note="Average: over the target columns shown (published: all targets).",
                   ) -> Table:
    """Rows trainers, columns ImageNet (source) + targets + Average over targets."""
    datasets = [d for d in dataset_order({r.dataset for r in runs}) if d != IMAGENET]
    columns = ([IMAGENET] if any(r.dataset == IMAGENET for r in runs) else []) + datasets
    table = Table(name, title, [*columns, "Average"], digits=2,
                  notes=notes + shot_notes(runs))
    keys = method_of(runs)
    for trainer in sorted({r.trainer for r in runs}):
        mine = [r for r in runs if r.trainer == trainer]
        cells = [seed_cell([r for r in mine if r.dataset == d]) for d in columns]
        targets = [c.mean for d, c in zip(columns, cells) if d != IMAGENET]
        average = None if None in targets or not targets else sum(targets) / len(targets)
        table.add(trainer, [*cells, Cell(average)], key=keys[trainer])
    reference.attach(table, refs, lambda ref: ref.dataset)
    table.notes.append(average_note)
    return table


def unfinished_notes(runs: Runs) -> list[str]:
    notes = ["Cells: mean ± std over seeds (population std, as CoOp's parse_test_res.py); "
             "HM: harmonic mean of the mean base and new accuracy; — : no run."]
    if runs.unfinished:
        notes.append(f"{runs.unfinished} run folder(s) with a log but no results.json "
                     "(unfinished) left out.")
    if runs.other_splits:
        notes.append(f"{runs.other_splits} result(s) on a split other than test left out.")
    if runs.damaged:
        notes.append(f"{len(runs.damaged)} run(s) left out as incomplete, their results.json "
                     "damaged: " + "; ".join(f"{d.where(short=True)} ({d.reason})"
                                             for d in runs.damaged) + ".")
    if runs.runs:
        notes.append(setting_note({(r.backbone, r.precision) for r in runs.runs}))
    return notes


@register
class Dassl(Kind):
    name = "dassl"
    patterns = ("results.json", "log.txt*")

    def load(self, paths) -> Runs:
        return load_runs(paths)

    def tables(self, runs: Runs, refs) -> list[Table]:
        notes = unfinished_notes(runs)
        by = collections.defaultdict(list)
        for r in by_setting(runs.runs):
            by[r.protocol].append(r)
        tables = []
        if by["base2new"]:
            tables += base2new_tables(by["base2new"], reference.select(refs, protocol="base2new"),
                                      notes)
        if by["xd"]:
            tables.append(transfer_table("dassl_xd", "Cross-dataset transfer (source: ImageNet)",
                                         by["source"] + by["xd"],
                                         reference.select(refs, protocol="xd"), notes))
        if by["dg"]:
            tables.append(transfer_table("dassl_dg", "Domain generalization (source: ImageNet)",
                                         by["source"] + by["dg"],
                                         reference.select(refs, protocol="dg"), notes))
        fewshot = by["fewshot"] + ([] if by["xd"] or by["dg"] else by["source"])
        if fewshot:
            title = "All classes, trained on the same dataset"
            # published zero-shot rows (CALIP's paper) beside it, one column per dataset
            tables.append(transfer_table("dassl_fewshot", title, fewshot,
                                         reference.select(refs, protocol="calip_zeroshot"), notes,
                                         "Average: over the columns other than ImageNet."))
        return tables
