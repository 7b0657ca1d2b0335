"""DomainBed adapter: registers the harness's methods and datasets into an unmodified
DomainBed and fixes the upstream behaviours listed in third_party/README.md.

`patch(module)` is called by algorithms/domainbed_hook.py right after each DomainBed
module in domainbed_hook.PATCHED_MODULES has been imported.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import torch

from algorithms import registry

NUM_WORKERS_ENV = "CLIPBENCH_NUM_WORKERS"  # overrides DomainBed's 8 loader workers per env


def harness_datasets():
    """DomainBed dataset classes the harness adds: name -> (dir under --data_dir, envs)."""
    from sweeps import world
    return {"CLIPWorld": (world.DOMAINBED_DIRNAME, tuple(sorted(world.DOMAINS)))}


# --- algorithms ---------------------------------------------------------------------

class _DomainBedAdapter:
    """Mixed into domainbed.algorithms.Algorithm: translates (minibatches, x) calls."""
    method_cls = None

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        classnames = hparams.get("class_names")
        if not classnames:
            raise ValueError(f"{self.method_cls.name}: the dataset gave no class names; "
                             "CLIP methods need an image-folder DomainBed dataset")
        if len(classnames) != num_classes:
            raise ValueError(f"{self.method_cls.name}: {len(classnames)} class names "
                             f"for {num_classes} classes")
        self.method = self.method_cls(classnames, hparams)

    def update(self, minibatches, unlabeled=None):
        images = torch.cat([x for x, _ in minibatches])
        labels = torch.cat([y for _, y in minibatches])
        return self.method.update(images, labels)

    def predict(self, x):
        return self.method.predict(x)


def _patch_algorithms(module):
    for name, method_cls in registry.methods().items():
        adapter = type(name, (_DomainBedAdapter, module.Algorithm),
                       {"method_cls": method_cls, "__module__": module.__name__})
        setattr(module, name, adapter)
        if name not in module.ALGORITHMS:
            module.ALGORITHMS.append(name)


# --- hyperparameters ----------------------------------------------------------------

def _patch_hparams_registry(module):
    from domainbed.lib import misc
    upstream = module._hparams

    def _hparams(algorithm, dataset, random_seed):
        hparams = upstream(algorithm, dataset, random_seed)
        methods = registry.methods()
        if algorithm in methods:
            for name, hp in methods[algorithm].hparams(dataset).items():
                random_state = np.random.RandomState(misc.seed_hash(random_seed, name))
                hparams[name] = (hp.default, hp.sample(random_state))
        return hparams

    module._hparams = _hparams


# --- datasets -----------------------------------------------------------------------

def _checked_loader(loader):
    def load(path):
        try:
            return loader(path)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read image {path}: {e}") from None
    return load


def _patch_datasets(module):
    from algorithms import clip_backbone
    from algorithms.classnames import classnames_from_folders
    image_folder = module.MultipleEnvironmentImageFolder
    upstream_init = image_folder.__init__

    def __init__(self, root, test_envs, augment, hparams):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"DomainBed dataset folder not found: {root}")
        upstream_init(self, root, test_envs, augment, hparams)
        workers = os.environ.get(NUM_WORKERS_ENV)
        if workers is not None:
            self.N_WORKERS = int(workers)
        for env in self.datasets:
            env.loader = _checked_loader(env.loader)
        if "clip_model" not in hparams:  # not a harness algorithm: upstream behaviour
            return
        hparams["class_names"] = classnames_from_folders(
            [env.classes for env in self.datasets], where=root)
        size = clip_backbone.image_size_of(hparams["clip_model"])
        for i, env in enumerate(self.datasets):
            env.transform = clip_backbone.clip_transform(size, train=augment and i not in test_envs)
        self.input_shape = (3, size, size)

    image_folder.__init__ = __init__

    for name, (dirname, environments) in harness_datasets().items():
        def init(self, root, test_envs, hparams, _dirname=dirname):
            image_folder.__init__(self, os.path.join(root, _dirname), test_envs,
                                  hparams["data_augmentation"], hparams)
        dataset_cls = type(name, (image_folder,), {
            "__init__": init, "ENVIRONMENTS": list(environments),
            "CHECKPOINT_FREQ": 100, "__module__": module.__name__})
        setattr(module, name, dataset_cls)
        if name not in module.DATASETS:
            module.DATASETS.append(name)


def _patch_fast_data_loader(module):
    upstream_init = module.InfiniteDataLoader.__init__

    def __init__(self, dataset, weights, batch_size, num_workers):
        if weights is None and len(dataset) < batch_size:
            raise ValueError(f"a training split holds {len(dataset)} images, fewer than "
                             f"batch_size={batch_size}: DomainBed's loader would spin forever")
        upstream_init(self, dataset, weights, batch_size, num_workers)

    module.InfiniteDataLoader.__init__ = __init__


# --- results ------------------------------------------------------------------------

def read_jsonl(path):
    """Records of a results.jsonl; a truncated or corrupt line is skipped with a warning."""
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{line_no}: skipping a truncated or corrupt record")
    return records


def _patch_reporting(module):
    def load_records(path):
        records = []
        for subdir in sorted(os.listdir(path)):
            results_path = os.path.join(path, subdir, "results.jsonl")
            if os.path.isfile(results_path):
                records.extend(read_jsonl(results_path))
        return module.Q(records)

    module.load_records = load_records


_PATCHES = {
    "domainbed.algorithms": _patch_algorithms,
    "domainbed.hparams_registry": _patch_hparams_registry,
    "domainbed.datasets": _patch_datasets,
    "domainbed.lib.fast_data_loader": _patch_fast_data_loader,
    "domainbed.lib.reporting": _patch_reporting,
}


def patch(module):
    if not getattr(module, "_clipbench_patched", False):
        _PATCHES[module.__name__](module)
        module._clipbench_patched = True


def patch_loaded():
    """Patch DomainBed modules imported before the hook was installed (tests)."""
    for name in _PATCHES:
        if name in sys.modules:
            patch(sys.modules[name])
