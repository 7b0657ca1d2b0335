"""Final-checkpoint selection: what AlignCLIP and CLIPood report, the model at the end of
training with fixed hyperparameters, as a DomainBed SelectionMethod beside upstream's
three. Registered in `domainbed.model_selection` and printed by `collect_results`
through the patch table (domainbed_adapter/patches.py); the harness's collector uses the
same class (results/kind_domainbed.py)."""
from __future__ import annotations

import sys

NAME = "FinalCheckpointSelectionMethod"
FIXED_HPARAMS_SEED = 0  # DomainBed's hparams_seed 0: the declared defaults (and recipe)


def selection_class(model_selection):
    """The SelectionMethod subclass, made from upstream's module."""

    class FinalCheckpointSelectionMethod(model_selection.SelectionMethod):
        """The last step's record of the run with hparams_seed 0: no early stopping, no
        search. val_acc (shown, never used to choose) is the training domains' mean out
        accuracy, test_acc the test domain's in accuracy, as training-domain validation."""
        name = "final checkpoint, fixed hyperparameters (hparams_seed 0)"

        @classmethod
        def run_acc(cls, run_records):
            records = model_selection.get_test_records(run_records)
            if not len(records):
                return None
            last = records.sorted(lambda r: r["step"])[-1]
            return model_selection.IIDAccuracySelectionMethod._step_acc(last)

        @classmethod
        def hparams_accs(cls, records):
            fixed = records.filter(lambda r: r["args"]["hparams_seed"] == FIXED_HPARAMS_SEED)
            return super().hparams_accs(fixed)

    FinalCheckpointSelectionMethod.__module__ = model_selection.__name__
    return FinalCheckpointSelectionMethod


def register(model_selection) -> None:
    setattr(model_selection, NAME, selection_class(model_selection))


def print_in_collect_results(reporting) -> None:
    """collect_results (run as __main__) loops over a list of upstream's three methods
    inside its main block; its first call after defining print_results_tables is
    load_records: there, wrap print_results_tables to print this method's tables after
    the oracle's (the last of the three; not with --auto_lr), when the sweep holds harness
    jobs."""
    load_records = reporting.load_records

    def load_and_hook(path):
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name == "domainbed.scripts.collect_results" \
                and not getattr(main, "_clipbench_final_checkpoint", False):
            main._clipbench_final_checkpoint = True
            _wrap_print_tables(main)
        return load_records(path)

    reporting.load_records = load_and_hook


def harness_runs(records) -> bool:
    """Records of harness jobs (their hparams carry run facts): the final-checkpoint tables
    are printed for sweeps that hold any (upstream-only sweeps print upstream's output)."""
    return any("run" in r["hparams"] for r in records)


def _wrap_print_tables(main) -> None:
    from domainbed import model_selection
    print_tables = main.print_results_tables
    final = getattr(model_selection, NAME)

    def print_results_tables(records, selection_method, latex):
        print_tables(records, selection_method, latex)
        if selection_method is model_selection.OracleSelectionMethod and harness_runs(records):
            if latex:
                print()
                print("\\subsection{{Model selection: {}}}".format(final.name))
            print_tables(records, final, latex)

    main.print_results_tables = print_results_tables
