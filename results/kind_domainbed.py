"""DomainBed sweeps: folders of job dirs, each with results.jsonl (one record per
checkpoint) and a `done` marker when the job finished.

Loading is ours and strict about what it scores: a job without `done` is left out and
counted (its cells show "—", never 0); a finished job whose results.jsonl is damaged (a
truncated or corrupt line, a record without the keys model selection needs, a doubled
record, records cut off before the last step: common/records.py) is left out too, as
incomplete, never scored on its remaining lines: one warning and a note under each of
its tables name the file and the line. So is a job of a harness algorithm (its hparams
name a `clip_model`) whose records carry no valid run facts (`hparams["run"]`,
common/run_facts.py: written before they were recorded). Upstream's algorithms (ERM, ...)
record no run facts: their environment names and step count come from the imported
`domainbed.datasets` class (ENVIRONMENTS, N_STEPS), else `env<i>`.

Rows never pool runs that differ in backbone or precision (read from the run facts;
upstream's algorithms: DomainBed's own network, `hparams["precision"]` else fp32): with
one setting in a sweep each table names it in a note, with several each row does. The
numbers are
upstream's: records are grouped by `domainbed.lib.reporting.get_grouped_records`
((trial_seed, dataset, algorithm, test_env); inside, the selection methods group by
hparams_seed) and each selection method of `domainbed.model_selection` picks the test
accuracy of every group. Per test domain: mean ± standard error over trials (population
std / sqrt(n), as collect_results prints). A dataset's Avg is the mean of its domain
means, missing if one is missing (as upstream).

One deliberate difference from collect_results: in the averages table a trial counts
for a dataset only when every test domain of that trial has a number; upstream averages
whatever domains a trial has, which on a partial sweep mixes different domain sets.
On a complete sweep both agree.
"""
from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.records import (Damage, alpha_runs, dataset_environments, dataset_of,
                            in_domain_accuracy, read_domainbed_job, wise_ft_alpha)
from common.run_facts import check_facts
from results import figures, reference
from results.kinds import Kind, register
from results.tables import Cell, Table, mean_se, setting_note

# (file-name tag, DomainBed selection method): upstream's three default methods, and the
# last checkpoint with fixed hyperparameters (domainbed_adapter/final_checkpoint.py)
SELECTIONS = (("iid", "IIDAccuracySelectionMethod"),
              ("loo", "LeaveOneOutSelectionMethod"),
              ("oracle", "OracleSelectionMethod"),
              ("final", "FinalCheckpointSelectionMethod"))


@dataclass
class Sweep:
    records: list = field(default_factory=list)   # records of finished jobs
    unfinished: collections.Counter = field(default_factory=collections.Counter)  # dataset -> jobs
    finished_jobs: int = 0
    damaged: list = field(default_factory=list)   # (dataset, Damage) of finished jobs left out

    def __bool__(self):
        return bool(self.records)


# --- loading ------------------------------------------------------------------------

def job_dirs(paths) -> list[Path]:
    """Job dirs: folders holding a matched file, plus their sibling folders in the same
    sweep folder (a job that crashed before its first record has no results.jsonl)."""
    jobs = {Path(p).parent for p in paths}
    for sweep in {j.parent for j in jobs}:
        jobs.update(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(jobs)


def load_job(job: Path, finished: bool = True) -> tuple[list, Damage | None]:
    """(records, damage) of a job folder (common/records.py); a finished job of a harness
    algorithm without valid run facts is damaged too."""
    records, damage = read_domainbed_job(job, finished)
    if damage is None and finished:
        damage = facts_problem(job / "results.jsonl", records)
    return records, damage


UPSTREAM_BACKBONE = "DomainBed's own network"
HARNESS_PROTOCOLS = ("domainbed", "domainbed_open")


def facts_of(record) -> dict | None:
    hparams = record.get("hparams")
    return hparams.get("run") if isinstance(hparams, dict) else None


def facts_problem(path: Path, records) -> Damage | None:
    """Why a finished job's records cannot be tabulated by their run facts (None: they
    can). A record of upstream's algorithms has none and needs none."""
    for record in records:
        facts, hparams = facts_of(record), record.get("hparams")
        if facts is None:
            if isinstance(hparams, dict) and "clip_model" in hparams:
                return Damage(path, None, "a harness job's record without run facts "
                              "(hparams.run; written before they were recorded)")
            continue
        try:
            check_facts(facts, "hparams.run")
        except ValueError as e:
            return Damage(path, None, str(e))
        if facts["protocol"] not in HARNESS_PROTOCOLS or not facts["backbone"] \
                or not facts["precision"]:
            return Damage(path, None, f"hparams.run of protocol {facts['protocol']!r}, "
                          f"backbone {facts['backbone']!r}, precision {facts['precision']!r}")
    return None


def setting_of(record) -> tuple[str, str]:
    """(backbone, precision) of the run that wrote `record`."""
    facts = facts_of(record)
    if facts is not None:
        return str(facts["backbone"]), str(facts["precision"])
    hparams = record.get("hparams") if isinstance(record.get("hparams"), dict) else {}
    return (str(hparams.get("clip_model") or UPSTREAM_BACKBONE),
            str(hparams.get("precision") or "fp32"))


def by_setting(records) -> tuple[list, dict]:
    """(records, keys): with several (backbone, precision) settings among `records`, each
    record's algorithm becomes `<algorithm> (<backbone>, <precision>)`, so that no row or
    selection group pools two settings; keys maps a row label to its algorithm (which
    published rows match)."""
    settings = {setting_of(r) for r in records}
    keys = {r["args"]["algorithm"]: r["args"]["algorithm"] for r in records}
    if len(settings) <= 1:
        return records, keys
    labelled, keys = [], {}
    for r in records:
        label = "{} ({}, {})".format(r["args"]["algorithm"], *setting_of(r))
        keys[label] = r["args"]["algorithm"]
        labelled.append({**r, "args": {**r["args"], "algorithm": label}})
    return labelled, keys


def rekey(table: Table, keys: dict) -> Table:
    for row in table.rows:
        if row.role == "measured" and row.key in keys:
            row.key = keys[row.key]
    return table


def load_sweep(paths) -> Sweep:
    sweep = Sweep()
    for job in job_dirs(paths):
        finished = (job / "done").exists()
        records, damage = load_job(job, finished)
        if finished and damage is None:
            sweep.records += records
            sweep.finished_jobs += 1
        elif finished:
            sweep.damaged.append((dataset_of(job), damage))
            warnings.warn(f"{damage}: finished DomainBed job left out as incomplete")
        elif records or damage or (job / "out.txt").exists() or (job / "err.txt").exists():
            dataset = records[0]["args"]["dataset"] if records else "?"
            sweep.unfinished[dataset] += 1
    if not sweep.records and (sweep.unfinished or sweep.damaged):
        warnings.warn(f"{sum(sweep.unfinished.values()) + len(sweep.damaged)} DomainBed "
                      "job(s) found, none finished with whole records")
    return sweep


# --- upstream -----------------------------------------------------------------------

def upstream():
    """(model_selection, reporting, Q) from DomainBed, or None when it is not importable."""
    try:
        from domainbed import model_selection  # the harness's import hook adds the final-checkpoint method
        from domainbed.lib import reporting
        from domainbed.lib.query import Q
    except ImportError as e:
        warnings.warn(f"DomainBed is not importable ({e}): DomainBed tables skipped "
                      "(run: python third_party/install.py)")
        return None
    return model_selection, reporting, Q


def env_names(dataset: str, n_envs: int, records=()) -> list[str]:
    """The dataset's environment names in env index order: the run facts' `domains`,
    else the `domainbed.datasets` class's ENVIRONMENTS, else env0, env1, ..."""
    for record in records:
        facts = facts_of(record)
        if facts is not None and facts.get("domains") and len(facts["domains"]) == n_envs:
            return [str(d) for d in facts["domains"]]
    names = dataset_environments(dataset)
    return names if names and len(names) == n_envs else [f"env{i}" for i in range(n_envs)]


def n_envs_of(records) -> int:
    return max(sum(1 for k in r if k.startswith("env") and k.endswith("_out_acc"))
               for r in records)


def selected_accs(records, method, reporting, Q) -> dict:
    """{(dataset, algorithm): {test_env: {trial_seed: test acc}}} chosen by `method`."""
    accs = collections.defaultdict(lambda: collections.defaultdict(dict))
    for group in reporting.get_grouped_records(Q(records)):
        acc = method.sweep_acc(group["records"])
        if acc is not None:
            accs[group["dataset"], group["algorithm"]][group["test_env"]][group["trial_seed"]] = acc
    return accs


# --- tables -------------------------------------------------------------------------

# --- domain + class shift (open-world variants, domainbed_adapter/open_world.py) --------
OPEN_SELECTIONS = ("iid", "oracle", "final")  # leave-one-out reads test-env in-accuracies as validation


def is_open_world(records) -> bool:
    """Whether the records' run facts name the domain + class shift protocol."""
    return any((r["hparams"].get("run") or {}).get("protocol") == "domainbed_open"
               for r in records)


def with_open_accuracy(record) -> dict:
    """The record with each test environment's in-accuracy replaced by its open-class
    accuracy (`env<k>_uda_acc` of the k-th test environment), so that upstream's
    selection picks the same checkpoint (validation keys are untouched) and reports the
    open score; None when the record has no open score."""
    test_envs = sorted(record["args"]["test_envs"])
    keys = [f"env{k}_uda_acc" for k in range(len(test_envs))]
    if not all(key in record for key in keys):
        return None
    return {**record, **{f"env{t}_in_acc": record[key] for t, key in zip(test_envs, keys)}}


def with_in_domain_accuracy(record) -> dict:
    """The record with the test environment's in-accuracy replaced by its in-domain
    accuracy: upstream's selection then reports the in-domain accuracy of the checkpoint
    it picks."""
    accuracy = in_domain_accuracy(record)
    if accuracy is None:
        return None
    return {**record, **{f"env{t}_in_acc": accuracy for t in record["args"]["test_envs"]}}


def in_and_out_of_domain_table(tag, method, datasets, algorithms, in_accs, out_accs,
                               n_envs) -> Table:
    """Per dataset: accuracy on held-out images of the training domains (in-domain) beside
    the test domains' (out-of-domain), each averaged over the held-out test domains."""
    columns = [f"{d} {part}" for d in datasets for part in ("in-domain", "out-of-domain")]
    table = Table(f"domainbed_{tag}_in_vs_out_of_domain",
                  f"In-domain vs out-of-domain accuracy, model selection: {method.name}",
                  columns, row_header="Algorithm")
    for algorithm in algorithms:
        cells = []
        for dataset in datasets:
            for accs in (in_accs, out_accs):
                trials = trial_averages(accs.get((dataset, algorithm), {}), n_envs[dataset])
                cells.append(Cell(*percent(*mean_se(trials)), n=len(trials)))
        table.add(algorithm, cells, key=algorithm)
    table.notes.append("in-domain: the training domains' held-out (out) images (for the "
                       "harness's algorithms read without augmentation); out-of-domain: the "
                       "test domain. Mean over test domains, ± standard error over trials.")
    return table


def hm(base, new):
    return None if base is None or new is None or base + new == 0 else 2 * base * new / (base + new)


def open_world_table(tag, method, dataset, algorithms, base_accs, open_accs, n_envs,
                     records=()) -> Table:
    """Per test domain base, open and their harmonic mean (of the trial means), and the
    averages over domains."""
    envs = env_names(dataset, n_envs, records)
    columns = [f"{env} {part}" for env in envs for part in ("base", "open", "HM")]
    table = Table(f"domainbed_{tag}_{dataset}_base_open",
                  f"{dataset}, domain + class shift, model selection: {method.name}",
                  [*columns, "Avg base", "Avg open", "Avg HM"], row_header="Algorithm",
                  figure_column="Avg HM")
    for algorithm in algorithms:
        cells, means = [], {"base": [], "open": []}
        for env in range(n_envs):
            pair = {}
            for part, accs in (("base", base_accs), ("open", open_accs)):
                trials = list(accs.get((dataset, algorithm), {}).get(env, {}).values())
                cell = Cell(*percent(*mean_se(trials)), n=len(trials))
                pair[part] = cell
                means[part].append(cell.mean)
                cells.append(cell)
            cells.append(Cell(hm(pair["base"].mean, pair["open"].mean)))
        avg = {part: None if None in values else sum(values) / len(values)
               for part, values in means.items()}
        table.add(algorithm, [*cells, Cell(avg["base"]), Cell(avg["open"]),
                              Cell(hm(avg["base"], avg["open"]))], key=algorithm)
    table.notes.append("base: test-domain images of the training classes, open: of the "
                       "classes never trained on, each classified among all classes; HM: "
                       "harmonic mean of the two means.")
    return table


OPEN_METRIC_COLUMNS = {"base": "base", "open": "open", "hm": "HM"}  # a `total` has no column


def attach_open_world(table, refs) -> None:
    """Published domain + class shift rows (results/reference/domainbed_open.csv) in an
    open-world table: a ref lands in `<domain> base|open|HM` (`Avg ...` for domain `Avg`)."""
    def column(ref):
        part = OPEN_METRIC_COLUMNS.get(ref.metric)
        return part and f"{ref.domain} {part}"
    before = len(table.rows)
    reference.attach(table, refs, column)
    if len(table.rows) > before:
        table.notes.append("Published rows: their paper's own training budget, without "
                           "DomainBed's model selection; — where the paper prints no number "
                           "(e.g. no HM).")


def percent(mean, err):
    return (None, None) if mean is None else (100 * mean, 100 * err)


def dataset_table(tag, method, dataset, algorithms, accs, n_envs, records=()) -> Table:
    envs = env_names(dataset, n_envs, records)
    table = Table(f"domainbed_{tag}_{dataset}", f"{dataset}, model selection: {method.name}",
                  [*envs, "Avg"], row_header="Algorithm", figure_column="Avg")
    for algorithm in algorithms:
        per_env = accs.get((dataset, algorithm), {})
        cells = []
        for env in range(n_envs):
            trials = list(per_env.get(env, {}).values())
            cells.append(Cell(*percent(*mean_se(trials)), n=len(trials)))
        means = [c.mean for c in cells]
        avg = None if None in means else sum(means) / len(means)
        table.add(algorithm, [*cells, Cell(avg, n=min(c.n for c in cells))], key=algorithm)
    return table


def trial_averages(per_env, n_envs) -> list[float]:
    """Per trial, the mean over test domains; only trials with every domain."""
    trials = set.intersection(*(set(per_env.get(e, {})) for e in range(n_envs)))
    return [float(np.mean([per_env[e][t] for e in range(n_envs)])) for t in sorted(trials)]


def averages_table(tag, method, datasets, algorithms, accs, n_envs) -> Table:
    table = Table(f"domainbed_{tag}_averages", f"Averages, model selection: {method.name}",
                  [*datasets, "Avg"], row_header="Algorithm")
    for algorithm in algorithms:
        cells = []
        for dataset in datasets:
            trials = trial_averages(accs.get((dataset, algorithm), {}), n_envs[dataset])
            cells.append(Cell(*percent(*mean_se(trials)), n=len(trials)))
        means = [c.mean for c in cells]
        avg = None if None in means else sum(means) / len(means)
        table.add(algorithm, [*cells, Cell(avg)], key=algorithm)
    return table


def common_notes(sweep: Sweep, datasets, tag, accs) -> list[str]:
    notes = ["Cells: mean ± standard error over trials (population std / √n, as DomainBed's "
             "collect_results); — : no number (DomainBed prints X)."]
    unfinished = sum(sweep.unfinished[d] for d in datasets)
    if unfinished:
        notes.append(f"{unfinished} unfinished job(s) (no `done`) left out.")
    damaged = [damage for dataset, damage in sweep.damaged if dataset in datasets]
    if damaged:
        notes.append(f"{len(damaged)} finished job(s) left out as incomplete, their "
                     f"results.jsonl damaged: " + "; ".join(
                         f"{d.where(short=True)} ({d.reason})" for d in damaged) + ".")
    if tag == "loo" and not accs:
        notes.append("Leave-one-domain-out needs runs with two test domains "
                     "(a sweep without --single_test_envs).")
    return notes


def backbone_note(records) -> list[str]:
    """Which backbone and precision the table shows (common to every kind)."""
    return [setting_note({setting_of(r) for r in records})] if records else []


# --- WiSE-FT (evaluation/wise_ft.py): alpha chosen like a hyperparameter --------------
WISE_FT_SELECTIONS = (("training-domain validation", "IIDAccuracySelectionMethod"),
                      ("oracle", "OracleSelectionMethod"))


def with_alpha_as_accuracy(record) -> dict:
    """The record with its test environments' in-accuracy replaced by its alpha: the
    selection then reports the alpha it picks."""
    return {**record, **{f"env{t}_in_acc": wise_ft_alpha(record)
                         for t in record["args"]["test_envs"]}}


def wise_ft_table(model_selection, reporting, Q, dataset, records, keys, n_envs):
    """Per WiSE-FT row and test domain: the alpha chosen on training-domain validation and
    by the oracle, with the test accuracy each gives (± over trials); None: no row."""
    records = [r for r in records if wise_ft_alpha(r) is not None]
    if not records:
        return None
    columns = [f"{what} ({tag})" for tag, _ in WISE_FT_SELECTIONS
               for what in ("alpha", "accuracy")]
    table = Table(f"domainbed_wise_ft_{dataset}", f"{dataset}, WiSE-FT: the alpha each "
                  "model selection chooses", columns, row_header="Algorithm, test domain",
                  digits=2)
    chosen = []
    for _, method_name in WISE_FT_SELECTIONS:
        method = getattr(model_selection, method_name)
        chosen += [(selected_accs(list(map(with_alpha_as_accuracy, records)), method,
                                  reporting, Q), 1.0),
                   (selected_accs(records, method, reporting, Q), 100.0)]
    envs = env_names(dataset, n_envs, records)
    for algorithm in sorted({r["args"]["algorithm"] for r in records}):
        for env in range(n_envs):
            cells = []
            for values, scale in chosen:
                mean, err = mean_se(values.get((dataset, algorithm), {}).get(env, {}).values())
                cells.append(Cell(None if mean is None else scale * mean,
                                  None if err is None else scale * err,
                                  n=len(values.get((dataset, algorithm), {}).get(env, {}))))
            if any(c.mean is not None for c in cells):
                table.add(f"{algorithm}, {envs[env]}", cells, key=algorithm)
    rekey(table, keys)
    table.notes.append("alpha: WiSE-FT's weight on the fine-tuned model (0: zero-shot, 1: "
                       "fine-tuned), chosen like a hyperparameter on the training domains' "
                       "held-out images (training-domain validation) or, marked oracle, on "
                       "the test domain's held-out images; accuracy: the test domain's, in %. "
                       "Mean ± standard error over trials.")
    return table


def wise_ft_curves(records) -> dict:
    """{dataset: {row: {alpha: (in-domain, out-of-domain) accuracy in %}}}, each the mean
    over the row's jobs (trials, test domains, hyperparameters)."""
    points = collections.defaultdict(lambda: collections.defaultdict(
        lambda: collections.defaultdict(list)))
    for r in records:
        alpha = wise_ft_alpha(r)
        if alpha is None:
            continue
        out_of_domain = np.mean([r[f"env{t}_in_acc"] for t in r["args"]["test_envs"]])
        points[r["args"]["dataset"]][r["args"]["algorithm"]][alpha].append(
            (in_domain_accuracy(r), out_of_domain))
    return {dataset: {row: {alpha: tuple(100 * np.mean(pairs, axis=0))
                            for alpha, pairs in sorted(by_alpha.items())}
                      for row, by_alpha in rows.items()}
            for dataset, rows in points.items()}


@register
class DomainBed(Kind):
    name = "domainbed"
    patterns = ("results.jsonl", "done")

    def load(self, paths) -> Sweep:
        return load_sweep(paths)

    def tables(self, sweep: Sweep, refs) -> list[Table]:
        modules = upstream()
        if modules is None:
            return []
        model_selection, reporting, Q = modules
        all_records, keys = by_setting(alpha_runs(sweep.records))
        datasets = sorted({r["args"]["dataset"] for r in all_records})
        n_envs = {d: n_envs_of([r for r in all_records if r["args"]["dataset"] == d])
                  for d in datasets}
        open_refs = reference.select(refs, protocol="domainbed_open")
        refs = reference.select(refs, protocol="domainbed")
        tables = []
        for tag, method_name in SELECTIONS:
            method = getattr(model_selection, method_name)
            accs = selected_accs(all_records, method, reporting, Q)
            for dataset in datasets:
                records = [r for r in all_records if r["args"]["dataset"] == dataset]
                algorithms = sorted({r["args"]["algorithm"] for r in records})
                table = rekey(dataset_table(tag, method, dataset, algorithms, accs,
                                            n_envs[dataset], records), keys)
                table.notes += common_notes(sweep, [dataset], tag, accs) + backbone_note(records)
                reference.attach(table, reference.select(refs, dataset=dataset),
                                 lambda ref: ref.domain)
                tables.append(table)
                if is_open_world(records) and tag in OPEN_SELECTIONS:
                    opened = [r for r in map(with_open_accuracy, records) if r is not None]
                    open_accs = selected_accs(opened, method, reporting, Q)
                    table = rekey(open_world_table(tag, method, dataset, algorithms, accs,
                                                   open_accs, n_envs[dataset], records), keys)
                    table.notes += common_notes(sweep, [dataset], tag, accs) + \
                        backbone_note(records)
                    attach_open_world(table, reference.select(open_refs, dataset=dataset))
                    tables.append(table)
            algorithms = sorted({r["args"]["algorithm"] for r in all_records})
            if tag == "iid":
                in_domain = [r for r in map(with_in_domain_accuracy, all_records) if r]
                in_accs = selected_accs(in_domain, method, reporting, Q)
                table = in_and_out_of_domain_table(tag, method, datasets, algorithms,
                                                   in_accs, accs, n_envs)
                table.notes += backbone_note(all_records)
                tables.append(rekey(table, keys))
            table = rekey(averages_table(tag, method, datasets, algorithms, accs, n_envs), keys)
            table.notes += common_notes(sweep, [*datasets, "?"], tag, accs) + [
                "A trial counts for a dataset only when all its test domains have a number."
            ] + backbone_note(all_records)
            reference.attach(table, [r for r in refs if r.domain == "Avg"],
                             lambda ref: ref.dataset)
            tables.append(table)
        for dataset in datasets:
            records = [r for r in all_records if r["args"]["dataset"] == dataset]
            table = wise_ft_table(model_selection, reporting, Q, dataset, records, keys,
                                  n_envs[dataset])
            if table is not None:
                tables.append(table)
        return tables

    def figures(self, sweep: Sweep, tables, out_dir) -> list[Path]:
        made = figures.bar_charts(tables, out_dir)
        for dataset, rows in wise_ft_curves(by_setting(sweep.records)[0]).items():
            made.append(figures.alpha_curves(
                rows, f"{dataset}: WiSE-FT, accuracy against alpha",
                Path(out_dir) / f"domainbed_wise_ft_{dataset}_curve.png"))
        return made
