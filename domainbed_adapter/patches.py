"""The patch table: for each DomainBed module the harness changes, the functions that
run right after that module is imported (hook.py derives its module list from here).
Each change and its reason: third_party/README.md. Imports stay inside the functions:
this module is read at every interpreter start."""
from __future__ import annotations

import sys


def _register_launchers(module):
    from sweeps.launchers import DOMAINBED_LAUNCHERS
    for name, launcher in DOMAINBED_LAUNCHERS.items():
        module.REGISTRY.setdefault(name, launcher)


def _register_algorithms(module):
    from domainbed_adapter import methods
    methods.register_algorithms(module)


def _declare_hparams(module):
    from domainbed_adapter import methods
    methods.declare_hparams(module)


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


def _tolerate_truncated_records(module):
    from common.files import read_jsonl
    import os

    def load_records(path):
        records = []
        for subdir in sorted(os.listdir(path)):
            results_path = os.path.join(path, subdir, "results.jsonl")
            if os.path.isfile(results_path):
                records.extend(read_jsonl(results_path))
        return module.Q(records)

    module.load_records = load_records


PATCHES = {
    "domainbed.command_launchers": (_register_launchers,),
    "domainbed.algorithms": (_register_algorithms,),
    "domainbed.hparams_registry": (_declare_hparams,),
    "domainbed.datasets": (_clip_image_folders, _register_datasets, _register_open_world),
    "domainbed.lib.misc": (_remember_splits,),
    "domainbed.lib.fast_data_loader": (_refuse_small_splits,),
    "domainbed.lib.reporting": (_tolerate_truncated_records,),
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
