"""The patch table: for each DomainBed module the harness changes, the functions that
run right after that module is imported (hook.py derives its module list from here).
Each change and its reason: third_party/README.md. Imports stay inside the functions:
this module is read at every interpreter start."""
from __future__ import annotations

import sys


def _register_launchers(module):
    from domainbed_adapter.launchers import DOMAINBED_LAUNCHERS
    for name, launcher in DOMAINBED_LAUNCHERS.items():
        module.REGISTRY.setdefault(name, launcher)


def _register_algorithms(module):
    from domainbed_adapter import methods
    methods.register_algorithms(module)


def _declare_hparams(module):
    from domainbed_adapter import methods
    methods.declare_hparams(module)


def _name_known_algorithms(module):
    from domainbed_adapter import names
    names.patch_lookup(module, "get_algorithm_class", "algorithm", "ALGORITHMS")


def _name_known_datasets(module):
    from domainbed_adapter import names
    names.patch_lookup(module, "get_dataset_class", "dataset", "DATASETS")


def _refuse_unknown_names(module):
    from domainbed_adapter import names
    names.patch_hparams_registry(module)


def _clip_image_folders(module):
    from domainbed_adapter import data
    data.patch_image_folder(module)


def _register_datasets(module):
    from clipworld import domainbed_dataset
    domainbed_dataset.register(module)


def _register_open_world(module):
    from domainbed_adapter import open_world
    open_world.register(module)


def _remember_splits(module):
    from domainbed_adapter import data
    data.remember_splits(module)


def _refuse_small_splits(module):
    from domainbed_adapter import data
    data.refuse_small_splits(module)


def _exclude_damaged_jobs(module):
    """load_records: a job whose results.jsonl is damaged (common/records.py, the reader
    the harness's collector uses too) is left out whole, with one line naming file and
    line (upstream crashes or, with a tolerant reader, scores the job on its remaining lines);
    WiSE-FT's records (one per alpha) become one run per alpha, so the oracle picks alpha
    on test-domain validation instead of taking the last (alpha 1)."""
    from pathlib import Path
    from common.records import alpha_runs, read_domainbed_job

    def load_records(path):
        records = []
        for job in sorted(p for p in Path(path).iterdir() if (p / "results.jsonl").is_file()):
            job_records, damage = read_domainbed_job(job, finished=(job / "done").exists())
            if damage is not None:
                print(f"collect_results: {damage}: job left out (incomplete)", file=sys.stderr)
            else:
                records.extend(job_records)
        return module.Q(alpha_runs(records))  # WiSE-FT: each alpha a run, as in results/

    module.load_records = load_records


def _final_checkpoint_selection(module):
    from domainbed_adapter import final_checkpoint
    final_checkpoint.register(module)


def _final_checkpoint_in_collect_results(module):
    from domainbed_adapter import final_checkpoint
    final_checkpoint.print_in_collect_results(module)


def _check_train_hparams(module):
    from domainbed_adapter import hparams_check
    hparams_check.patch_registry(module)


def _debug_dataset_hparams(module):
    from domainbed_adapter import debug_datasets
    debug_datasets.patch_hparams(module)


def _debug_dataset_class_names(module):
    from domainbed_adapter import debug_datasets
    debug_datasets.patch_datasets(module)


PATCHES = {
    "domainbed.command_launchers": (_register_launchers,),
    "domainbed.algorithms": (_register_algorithms, _name_known_algorithms),
    "domainbed.hparams_registry": (_declare_hparams, _refuse_unknown_names,
                                   _debug_dataset_hparams, _check_train_hparams),
    "domainbed.datasets": (_clip_image_folders, _register_datasets, _register_open_world,
                           _name_known_datasets, _debug_dataset_class_names),
    "domainbed.lib.misc": (_remember_splits,),
    "domainbed.lib.fast_data_loader": (_refuse_small_splits,),
    "domainbed.lib.reporting": (_exclude_damaged_jobs, _final_checkpoint_in_collect_results),
    "domainbed.model_selection": (_final_checkpoint_selection,),
}


def patch(module):
    if not getattr(module, "_clipbench_patched", False):
        module._clipbench_patched = True
        for fn in PATCHES[module.__name__]:
            fn(module)


def patch_loaded():
    """Patch DomainBed modules imported before the hook was installed (tests)."""
    for name in PATCHES:
        if name in sys.modules:
            patch(sys.modules[name])
