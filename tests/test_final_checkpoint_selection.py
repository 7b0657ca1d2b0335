"""Final-checkpoint selection (domainbed_adapter/final_checkpoint.py): the last step of the
run with fixed hyperparameters (hparams_seed 0), on a hand-made record set, in the
harness's collector and in DomainBed's own collect_results run through the harness."""
import pytest

from tests.conftest import PY, needs_domainbed, run
from tests.test_results_domainbed import (cell, make_job, parse_collect_results,
                                          tables_by_name)

NAME = "final checkpoint, fixed hyperparameters (hparams_seed 0)"


def hand_made_sweep(root):
    """Test env 0 (A), trial 0. hparams 0: step 0 has the best validation (0.9) and the
    best test-domain out accuracy, step 200 is the last (test 0.55); hparams 1 validates
    better at every step (oracle and training-domain validation pick it), test 0.99."""
    make_job(root, "CLIPood", [0], 0, 0, [
        {0: (0.70, 0.9), 1: (0.9, 0.9), 2: (0.9, 0.9), 3: (0.9, 0.9)},
        {0: (0.60, 0.2), 1: (0.6, 0.6), 2: (0.6, 0.6), 3: (0.6, 0.6)},
        {0: (0.55, 0.1), 1: (0.5, 0.5), 2: (0.5, 0.5), 3: (0.5, 0.5)}])
    make_job(root, "CLIPood", [0], 0, 1, [
        {0: (0.40, 0.3), 1: (0.95, 0.95), 2: (0.95, 0.95), 3: (0.95, 0.95)},
        {0: (0.80, 0.4), 1: (0.96, 0.96), 2: (0.96, 0.96), 3: (0.96, 0.96)},
        {0: (0.99, 0.5), 1: (0.97, 0.97), 2: (0.97, 0.97), 3: (0.97, 0.97)}])
    return root


@needs_domainbed
def test_picks_the_last_step_of_the_fixed_hparams(tmp_path):
    from domainbed import model_selection
    from domainbed.lib.query import Q
    from domainbed_adapter import patches
    from common.records import read_domainbed_job
    patches.patch(model_selection)
    method = model_selection.FinalCheckpointSelectionMethod
    assert method.name == NAME
    records = []
    for job in sorted(hand_made_sweep(tmp_path).iterdir()):
        records += read_domainbed_job(job, finished=True)[0]
    assert method.sweep_acc(Q(records)) == pytest.approx(0.55)
    run = Q([r for r in records if r["args"]["hparams_seed"] == 0])
    assert method.run_acc(run) == {"val_acc": pytest.approx(0.5), "test_acc": 0.55}
    no_defaults = Q([r for r in records if r["args"]["hparams_seed"] == 1])
    assert method.sweep_acc(no_defaults) is None  # no run with the fixed hyperparameters


@needs_domainbed
def test_harness_collector_has_the_final_checkpoint_tables(tmp_path):
    _, tables = tables_by_name(hand_made_sweep(tmp_path))
    final = tables["domainbed_final_PACS"]
    assert NAME in final.title
    assert cell(final, "CLIPood", "A").mean == pytest.approx(55.0)
    assert cell(tables["domainbed_iid_PACS"], "CLIPood", "A").mean == pytest.approx(99.0)
    assert cell(tables["domainbed_oracle_PACS"], "CLIPood", "A").mean == pytest.approx(99.0)
    assert "domainbed_final_averages" in tables


@needs_domainbed
def test_collect_results_through_the_harness_prints_it(tmp_path):
    sweep = hand_made_sweep(tmp_path / "sweep")
    proc = run([PY, "-m", "domainbed.scripts.collect_results", "--input_dir", str(sweep)],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = parse_collect_results(proc.stdout)
    assert cells[(NAME, "PACS", "CLIPood", "A")] == "55.0 +/- 0.0"
    assert cells[("test-domain validation set (oracle)", "PACS", "CLIPood", "A")] == "99.0 +/- 0.0"
    titles = [line for line in proc.stdout.splitlines() if "model selection method" in line]
    assert titles[-2:] == [f"-------- Dataset: PACS, model selection method: {NAME}",
                           f"-------- Averages, model selection method: {NAME}"]
