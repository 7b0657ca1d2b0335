"""DomainBed tables: fake sweeps shaped like upstream's (job dirs with results.jsonl and
`done`), loaded robustly, selected by DomainBed's own model selection, checked by hand
and against `python -m domainbed.scripts.collect_results`."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.run_facts import run_facts
from results import kind_domainbed, reference
from results.kind_domainbed import load_sweep
from results.tables import to_markdown
from tests.conftest import PY, job_records, needs_domainbed, run

PACS_ENVS = ["A", "C", "P", "S"]


def job_facts(algorithm, dataset, test_envs, trial_seed, hparams_seed, steps,
              precision="fp32", backbone="tiny-vit"):
    """The run facts the DomainBed adapter records in hparams["run"] (common/run_facts.py)."""
    domains = PACS_ENVS if dataset == "PACS" else None
    return run_facts(protocol="domainbed_open" if dataset.endswith("Open") else "domainbed",
                     stage="train", method=algorithm, config={"lr": 1e-5 * (hparams_seed + 1)},
                     precision=precision, backbone=backbone, weights_digest="sha256:0",
                     dataset=dataset, domains=domains,
                     test_domains=[domains[t] for t in test_envs] if domains else None,
                     seeds={"trial_seed": trial_seed, "hparams_seed": hparams_seed, "seed": 1234},
                     steps=steps)


def make_job(sweep, algorithm, test_envs, trial_seed, hparams_seed, steps, dataset="PACS",
             done=True, truncate=False, precision="fp32", backbone="tiny-vit", facts=True):
    """One job dir like DomainBed's train.py writes: a record per checkpoint (`steps` is a
    list of {env: (in_acc, out_acc)}), then `done` when it finished. Its hparams hold the
    run facts (facts=False: a record written before they were recorded)."""
    name = (f"{algorithm}_{dataset}_{'-'.join(map(str, test_envs))}_t{trial_seed}_h{hparams_seed}"
            + ("" if (precision, backbone) == ("fp32", "tiny-vit") else f"_{backbone}_{precision}"))
    job = sweep / name
    job.mkdir(parents=True)
    (job / "out.txt").write_text("Args:\n")
    lines = []
    facts = job_facts(algorithm, dataset, test_envs, trial_seed, hparams_seed,
                      (len(steps) - 1) * 100 + 1, precision, backbone) if facts else None
    for step, accs in enumerate(steps):
        record = {"args": {"algorithm": algorithm, "dataset": dataset, "test_envs": test_envs,
                           "hparams_seed": hparams_seed, "trial_seed": trial_seed,
                           "holdout_fraction": 0.2, "task": "domain_generalization",
                           "hparams": json.dumps({"lr": 1e-5 * (hparams_seed + 1)}),
                           "output_dir": str(job), "seed": 1234, "checkpoint_freq": 100,
                           "steps": (len(steps) - 1) * 100 + 1},  # the last record is the last step
                  "hparams": {"lr": 1e-5 * (hparams_seed + 1), "clip_model": backbone,
                              "precision": precision, **({"run": facts} if facts else {})},
                  "step": step * 100, "epoch": float(step), "mem_gb": 0.1, "step_time": 0.1}
        for env, (acc_in, acc_out) in accs.items():
            record[f"env{env}_in_acc"], record[f"env{env}_out_acc"] = acc_in, acc_out
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    if truncate:  # a job killed while writing its last line
        text += lines[-1][: len(lines[-1]) // 2]
    (job / "results.jsonl").write_text(text)
    if done:
        (job / "done").write_text("done")
    return job


def random_sweep(root, algorithms=("ZSCLIP", "CLIPood"), trials=3, hparams=2, steps=3, seed=0):
    """A full sweep on PACS: every single test env and every pair (for leave-one-out)."""
    rng = np.random.default_rng(seed)
    envs = range(len(PACS_ENVS))
    test_env_sets = [[e] for e in envs] + [[a, b] for a in envs for b in envs if a < b]
    for algorithm in algorithms:
        for trial in range(trials):
            for hp in range(hparams):
                for test_envs in test_env_sets:
                    accs = [{e: tuple(rng.uniform(0.3, 0.95, 2)) for e in envs}
                            for _ in range(steps)]
                    make_job(root, algorithm, test_envs, trial, hp, accs)
    return root


def tables_by_name(sweep_dir):
    sweep = load_sweep(sorted(sweep_dir.rglob("results.jsonl")))
    tables = kind_domainbed.DomainBed().tables(sweep, reference.load())
    return sweep, {t.name: t for t in tables}


def cell(table, row_label, column):
    row = next(r for r in table.rows if r.label == row_label)
    return table.cell(row, column)


# --- loading (no upstream needed) -----------------------------------------------------

def test_unfinished_jobs_are_left_out_and_counted(tmp_path):
    make_job(tmp_path, "ZSCLIP", [0], 0, 0, [{0: (0.5, 0.5), 1: (0.6, 0.6)}])
    make_job(tmp_path, "ZSCLIP", [1], 0, 0, [{0: (0.99, 0.99), 1: (0.99, 0.99)}], done=False)
    crashed = tmp_path / "crashed_before_first_record"
    crashed.mkdir()
    (crashed / "err.txt").write_text("Traceback ...")
    sweep = load_sweep(sorted(tmp_path.rglob("results.jsonl")))
    assert sweep.finished_jobs == 1 and len(sweep.records) == 1
    assert sweep.unfinished == {"PACS": 1, "?": 1}


def test_a_finished_job_with_a_damaged_line_is_left_out_whole_naming_file_and_line(tmp_path):
    intact = make_job(tmp_path, "ZSCLIP", [0], 0, 0, [{0: (0.5, 0.5), 1: (0.6, 0.6)}] * 2)
    truncated = make_job(tmp_path, "ZSCLIP", [0], 1, 0, [{0: (0.9, 0.9), 1: (0.9, 0.9)}] * 2,
                         truncate=True)
    malformed = make_job(tmp_path, "ZSCLIP", [0], 2, 0, [{0: (0.9, 0.9), 1: (0.9, 0.9)}] * 2)
    lines = (malformed / "results.jsonl").read_text().splitlines()
    (malformed / "results.jsonl").write_text(
        "\n".join([lines[0], '{"args": {"algorithm": "ZSCLIP"}, "step": 5}', lines[1]]) + "\n")
    with pytest.warns(UserWarning) as caught:
        sweep = load_sweep(sorted(tmp_path.rglob("results.jsonl")))
    messages = [str(w.message) for w in caught]
    assert (f"{truncated / 'results.jsonl'}:3: truncated record (the file ends inside it): "
            "finished DomainBed job left out as incomplete") in messages
    assert any(m.startswith(f"{malformed / 'results.jsonl'}:2: a record without dataset")
               for m in messages)
    assert sweep.finished_jobs == 1 and sweep.records == load_sweep([intact / "results.jsonl"]).records
    assert [d.line for _, d in sweep.damaged] == [3, 2]


def test_records_cut_at_a_line_boundary_or_doubled_are_damage(tmp_path):
    """A finished job must end with its last step, once: a file cut after a whole line
    (lost records) or a job rerun into the same folder (doubled records) is damaged."""
    steps = [{0: (0.5, 0.5), 1: (0.6, 0.6)}] * 3
    cut = make_job(tmp_path, "ZSCLIP", [0], 0, 0, steps)
    lines = (cut / "results.jsonl").read_text().splitlines(keepends=True)
    (cut / "results.jsonl").write_text("".join(lines[:2]))
    doubled = make_job(tmp_path, "ZSCLIP", [0], 1, 0, steps)
    (doubled / "results.jsonl").write_text("".join(lines * 2))
    empty = make_job(tmp_path, "ZSCLIP", [0], 2, 0, steps)
    (empty / "results.jsonl").write_text("")
    with pytest.warns(UserWarning):
        sweep = load_sweep(sorted(tmp_path.rglob("done")))
    reasons = {d.path.parent: (d.line, d.reason) for _, d in sweep.damaged}
    assert reasons[cut] == (3, "records end at step 100, the job's last step is 200 "
                               "(records cut off)")
    assert reasons[doubled] == (4, "step 0 after step 200 (a doubled or reordered record)")
    assert reasons[empty] == (None, "no record, although the job finished (`done`)")
    assert not sweep.records and sweep.finished_jobs == 0


def test_env_names_come_from_the_run_facts_else_upstream_else_fall_back():
    named = {"hparams": {"run": job_facts("ZSCLIP", "PACS", [0], 0, 0, 1)}}
    named["hparams"]["run"]["domains"] = ["w", "x", "y", "z"]
    assert kind_domainbed.env_names("PACS", 4, [named]) == ["w", "x", "y", "z"]
    if kind_domainbed.dataset_environments("PACS"):  # the imported upstream class's
        assert kind_domainbed.env_names("PACS", 4) == PACS_ENVS
    assert kind_domainbed.env_names("NotADataset", 2) == ["env0", "env1"]


def test_a_harness_job_without_run_facts_is_left_out_and_named(tmp_path):
    make_job(tmp_path, "ZSCLIP", [0], 0, 0, [{0: (0.5, 0.5), 1: (0.6, 0.6)}])
    old = make_job(tmp_path, "CLIPood", [0], 0, 0, [{0: (0.5, 0.5), 1: (0.6, 0.6)}],
                   facts=False)
    with pytest.warns(UserWarning, match=f"{old.name}/results.jsonl: a harness job's record "
                      "without run facts"):
        sweep = load_sweep(sorted(tmp_path.rglob("done")))
    assert {r["args"]["algorithm"] for r in sweep.records} == {"ZSCLIP"}
    assert [d.path.parent for _, d in sweep.damaged] == [old]
    bad = make_job(tmp_path / "bad", "ZSCLIP", [0], 0, 0, [{0: (0.5, 0.5), 1: (0.6, 0.6)}])
    text = (bad / "results.jsonl").read_text().replace('"schema": "clipbench-run-v1", ', "")
    (bad / "results.jsonl").write_text(text)
    with pytest.warns(UserWarning, match="run facts lack schema"):
        assert not load_sweep(sorted((tmp_path / "bad").rglob("done")))


def test_an_upstream_algorithm_needs_no_run_facts(tmp_path):
    job = make_job(tmp_path, "ERM", [0], 0, 0, [{0: (0.5, 0.5), 1: (0.6, 0.6)}], facts=False)
    text = (job / "results.jsonl").read_text().replace('"clip_model": "tiny-vit", ', "")
    (job / "results.jsonl").write_text(text)
    sweep = load_sweep(sorted(tmp_path.rglob("done")))
    assert len(sweep.records) == 1 and not sweep.damaged
    assert kind_domainbed.setting_of(sweep.records[0]) == (kind_domainbed.UPSTREAM_BACKBONE,
                                                           "fp32")


# --- selection and statistics (upstream model_selection) ------------------------------

@needs_domainbed
def test_mean_and_standard_error_by_hand(tmp_path):
    # one checkpoint per job: the selected test accuracy is env{t}_in_acc
    for trial, acc in enumerate([0.80, 0.85, 0.90]):
        for test_env in range(4):
            make_job(tmp_path, "ZSCLIP", [test_env], trial, 0,
                     [{e: (acc if e == test_env else 0.5, 0.5) for e in range(4)}])
    _, tables = tables_by_name(tmp_path)
    a = cell(tables["domainbed_iid_PACS"], "ZSCLIP", "A")
    # mean 85.0; population std sqrt(50/3) = 4.0825; / sqrt(3) = 2.357
    assert a.mean == pytest.approx(85.0) and a.err == pytest.approx(2.3570226) and a.n == 3
    assert a.text(1) == "85.0 ± 2.4"
    averages = tables["domainbed_iid_averages"]
    assert cell(averages, "ZSCLIP", "PACS").text(1) == "85.0 ± 2.4"


@needs_domainbed
def test_mixed_hparams_are_grouped_by_hparams_seed(tmp_path):
    # hparams 0: best val (mean out-acc of train envs) 0.70 at step 1 -> test 0.61
    make_job(tmp_path, "ZSCLIP", [0], 0, 0, [
        {0: (0.40, 0.9), 1: (0.5, 0.5), 2: (0.5, 0.5), 3: (0.5, 0.5)},
        {0: (0.61, 0.1), 1: (0.7, 0.7), 2: (0.7, 0.7), 3: (0.7, 0.7)}])
    # hparams 1: best val 0.80 at step 0 -> test 0.52 (this one is selected)
    make_job(tmp_path, "ZSCLIP", [0], 0, 1, [
        {0: (0.52, 0.2), 1: (0.8, 0.8), 2: (0.8, 0.8), 3: (0.8, 0.8)},
        {0: (0.99, 0.3), 1: (0.6, 0.6), 2: (0.6, 0.6), 3: (0.6, 0.6)}])
    _, tables = tables_by_name(tmp_path)
    assert cell(tables["domainbed_iid_PACS"], "ZSCLIP", "A").mean == pytest.approx(52.0)
    # oracle: last checkpoint, best test-env out-acc across hparams: hparams 1 (0.3 > 0.1)
    assert cell(tables["domainbed_oracle_PACS"], "ZSCLIP", "A").mean == pytest.approx(99.0)
    # the other test envs have no job: missing, never 0
    iid = tables["domainbed_iid_PACS"]
    assert cell(iid, "ZSCLIP", "C").mean is None and cell(iid, "ZSCLIP", "Avg").mean is None
    assert "| ZSCLIP | 52.0 ± 0.0 | — | — | — | — |" in to_markdown(iid)


@needs_domainbed
def test_runs_that_differ_in_precision_or_backbone_are_never_pooled(tmp_path):
    for precision, backbone, acc in (("fp32", "tiny-vit", 0.8), ("bf16", "tiny-vit", 0.6),
                                     ("fp32", "ViT-B-16", 0.4)):
        make_job(tmp_path, "ZSCLIP", [0], 0, 0, [{e: (acc, 0.5) for e in range(4)}],
                 precision=precision, backbone=backbone)
    _, tables = tables_by_name(tmp_path)
    for name in ("domainbed_iid_PACS", "domainbed_oracle_PACS", "domainbed_iid_averages"):
        table = tables[name]
        rows = {r.label: r for r in table.rows if r.role == "measured"}
        assert set(rows) == {"ZSCLIP (tiny-vit, fp32)", "ZSCLIP (tiny-vit, bf16)",
                             "ZSCLIP (ViT-B-16, fp32)"}, name
        if name.endswith("PACS"):
            assert table.cell(rows["ZSCLIP (tiny-vit, bf16)"], "A").mean == pytest.approx(60.0)
            assert table.cell(rows["ZSCLIP (ViT-B-16, fp32)"], "A").mean == pytest.approx(40.0)
        assert all(r.key == "ZSCLIP" for r in rows.values())  # published rows still match
        assert any("never pooled" in n and "(tiny-vit, bf16)" in n for n in table.notes), name
    (tmp_path / "one").mkdir()
    make_job(tmp_path / "one", "ZSCLIP", [0], 0, 0, [{e: (0.7, 0.5) for e in range(4)}],
             precision="bf16")
    _, tables = tables_by_name(tmp_path / "one")
    for table in tables.values():  # one setting: plain rows, each table names it
        assert "These runs' backbone: tiny-vit; precision: bf16." in table.notes, table.name
        assert {r.label for r in table.rows if r.role == "measured"} == {"ZSCLIP"}


@needs_domainbed
def test_unfinished_job_shows_as_missing_not_zero(tmp_path):
    for test_env in range(4):
        make_job(tmp_path, "ZSCLIP", [test_env], 0, 0,
                 [{e: (0.7, 0.7) for e in range(4)}], done=test_env != 3)
    _, tables = tables_by_name(tmp_path)
    iid = tables["domainbed_iid_PACS"]
    assert cell(iid, "ZSCLIP", "S").mean is None and cell(iid, "ZSCLIP", "A").mean == 70.0
    assert "1 unfinished job(s) (no `done`) left out." in iid.notes
    averages = tables["domainbed_iid_averages"]
    assert cell(averages, "ZSCLIP", "PACS").mean is None  # an incomplete trial does not count


@needs_domainbed
def test_published_rows_and_deltas(tmp_path):
    random_sweep(tmp_path, trials=1, hparams=1, steps=1)
    _, tables = tables_by_name(tmp_path)
    table = tables["domainbed_iid_PACS"]
    labels = [r.label for r in table.rows]
    assert "CLIPood (published, ViT-B/16)" in labels
    published = cell(table, "CLIPood (published, ViT-B/16)", "Avg").mean
    measured = cell(table, "CLIPood", "Avg").mean
    delta = cell(table, "Δ CLIPood − CLIPood (published)", "Avg").mean
    assert delta == pytest.approx(measured - published)
    assert any(n.startswith("Published: Zhang et al., Domain-Inspired") for n in table.notes)
    averages = tables["domainbed_iid_averages"]
    assert cell(averages, "CLIP (zero-shot) (published, ViT-B/16)", "PACS").mean == 96.2


# --- agreement with upstream's collect_results ----------------------------------------

def parse_collect_results(text):
    """{(selection name, dataset or 'Averages', algorithm, column): cell text}."""
    cells, header, section = {}, None, None
    for line in text.splitlines():
        m = re.match(r"-------- (?:Dataset: (\w+)|(Averages)), model selection method: (.+)$", line)
        if m:
            section, header = (m.group(1) or m.group(2), m.group(3).strip()), None
            continue
        if section and line.strip():
            parts = re.split(r"\s{2,}", line.strip())
            if header is None:
                header = parts
            else:
                for column, value in zip(header[1:], parts[1:]):
                    cells[(section[1], section[0], parts[0], column)] = value
    return cells


def harness_text(table, column):
    c = table.cell(next(r for r in table.rows if r.label == column[0]), column[1])
    if c.mean is None:
        return "X"
    return f"{c.mean:.1f}" if c.err is None else f"{c.mean:.1f} +/- {c.err:.1f}"


@needs_domainbed
def test_agrees_with_upstream_collect_results(tmp_path):
    sweep_dir = random_sweep(tmp_path / "sweep")
    # a truncated last line in one job: both collectors leave that job out (one of
    # hparams_seed 1: the final-checkpoint selection reads only hparams_seed 0, and a
    # trial it misses a domain of would meet the deliberate difference in the averages)
    job = next(j for j in sorted(sweep_dir.iterdir()) if j.name.endswith("_h1"))
    with open(job / "results.jsonl", "a") as f:
        f.write('{"args": {"algorithm"')
    proc = run([PY, "-m", "domainbed.scripts.collect_results", "--input_dir", str(sweep_dir)],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"collect_results: {job / 'results.jsonl'}:4: truncated record (the file ends "
            "inside it): job left out (incomplete)") in proc.stderr.splitlines()
    upstream = parse_collect_results(proc.stdout)
    with pytest.warns(UserWarning, match=rf"{job.name}/results.jsonl:4: truncated record"):
        _, tables = tables_by_name(sweep_dir)
    from domainbed import model_selection
    tags = {getattr(model_selection, name).name: tag for tag, name in kind_domainbed.SELECTIONS}
    compared = 0
    for (selection, section, algorithm, column), text in upstream.items():
        name = f"domainbed_{tags[selection]}_{'averages' if section == 'Averages' else section}"
        assert harness_text(tables[name], (algorithm, column)) == text, (name, algorithm, column)
        compared += 1
    # 4 selections (upstream's 3, final checkpoint) x (PACS: 2 algorithms x 5 columns +
    # Averages: 2 x 2)
    assert compared == 4 * (2 * 5 + 2 * 2)
    assert "X" not in upstream.values()  # leave-one-out had its pairs: all cells compared


# --- a real finished job (DomainBed's train.py on the generated world) ----------------

@pytest.fixture(scope="module")
def clipft_sweep(small_world, tmp_path_factory):
    """A sweep folder with one real finished CLIPFT job (tiny CLIP, 2 steps, a record
    per step) as trial 0 and its copy, relabelled, as trial 1."""
    sweep = tmp_path_factory.mktemp("clipft_sweep")
    job = sweep / "job_t0"
    hparams = {"clip_model": "tiny-vit", "clip_pretrained": "", "batch_size": 8}
    proc = run([PY, "-m", "domainbed.scripts.train", "--algorithm", "CLIPFT",
                "--dataset", "CLIPWorld", "--data_dir", small_world["domainbed_root"],
                "--test_envs", "0", "--steps", "2", "--checkpoint_freq", "1",
                "--skip_model_save", "--output_dir", str(job), "--hparams", json.dumps(hparams)],
               cwd=sweep, env={"CLIPBENCH_NUM_WORKERS": "0"})
    assert proc.returncode == 0 and (job / "done").exists(), (proc.stdout + proc.stderr)[-3000:]
    copy = sweep / "job_t1"
    shutil.copytree(job, copy)
    records = job_records(job)
    for record in records:
        record["args"].update(trial_seed=1, output_dir=str(copy))
    (copy / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return sweep


def damage(results: Path, how: str) -> int:
    """Damage a results.jsonl; return the line a reader must name."""
    lines = results.read_text().splitlines(keepends=True)
    if how == "truncated":    # killed while writing its last line
        results.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
        return len(lines)
    if how == "cut":          # the last line lost whole: the last step is missing
        results.write_text("".join(lines[:-1]))
        return len(lines)
    results.write_text("\x00\x7fgarbage\n" + "".join(lines))  # a corrupt line
    return 1


@needs_domainbed
@pytest.mark.parametrize("how", ["truncated", "cut", "garbage"])
def test_real_job_with_a_damaged_record_is_shown_incomplete(clipft_sweep, tmp_path, how):
    sweep = tmp_path / "sweep"
    shutil.copytree(clipft_sweep, sweep)
    only_t0 = tmp_path / "only_t0"
    shutil.copytree(clipft_sweep / "job_t0", only_t0 / "job_t0")
    _, before = tables_by_name(sweep)
    name = "domainbed_iid_CLIPWorld"
    test_domain = before[name].columns[0]
    assert cell(before[name], "CLIPFT", test_domain).n == 2

    line = damage(sweep / "job_t1" / "results.jsonl", how)
    with pytest.warns(UserWarning, match=rf"job_t1/results.jsonl:{line}: .*left out as incomplete"):
        loaded, after = tables_by_name(sweep)
    damaged = cell(after[name], "CLIPFT", test_domain)
    intact = cell(tables_by_name(only_t0)[1][name], "CLIPFT", test_domain)
    assert damaged.n == 1 and damaged.mean == intact.mean  # never scored on what is left
    assert loaded.finished_jobs == 1 and len(loaded.damaged) == 1
    assert any(note.startswith("1 finished job(s) left out as incomplete") and
               f"job_t1/results.jsonl:{line} (" in note for note in after[name].notes)


@needs_domainbed
def test_collect_results_through_the_harness_leaves_a_damaged_job_out(clipft_sweep, tmp_path):
    """Upstream's collect_results prints what it prints for the sweep without the damaged
    job, plus one line on stderr naming file and line."""
    sweep, only_t0 = tmp_path / "sweep", tmp_path / "only_t0"
    shutil.copytree(clipft_sweep, sweep)
    shutil.copytree(clipft_sweep / "job_t0", only_t0 / "job_t0")
    line = damage(sweep / "job_t1" / "results.jsonl", "truncated")
    damaged = run([PY, "-m", "domainbed.scripts.collect_results", "--input_dir", str(sweep)],
                  cwd=tmp_path)
    reference_run = run([PY, "-m", "domainbed.scripts.collect_results", "--input_dir",
                         str(only_t0)], cwd=tmp_path)
    assert damaged.returncode == 0 and reference_run.returncode == 0, damaged.stderr[-2000:]
    assert damaged.stdout == reference_run.stdout and "CLIPFT" in damaged.stdout
    named = [l for l in damaged.stderr.splitlines() if "results.jsonl" in l]
    assert named == [f"collect_results: {sweep / 'job_t1' / 'results.jsonl'}:{line}: truncated "
                     "record (the file ends inside it): job left out (incomplete)"]
