"""DomainBed adapter: registers the harness's methods and datasets into an unmodified
DomainBed and fixes the upstream behaviours listed in third_party/README.md.

`patch(module)` is called by algorithms/domainbed_hook.py right after each DomainBed
module in domainbed_hook.PATCHED_MODULES has been imported.
"""
from __future__ import annotations

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
        self._held_out_done = False  # see "held-out data" below

    def update(self, minibatches, unlabeled=None):
        images = torch.cat([x for x, _ in minibatches])
        labels = torch.cat([y for _, y in minibatches])
        selected = {}
        if not self._held_out_done and not self.method.has_trainable_parameters():
            # training-free: select before the first step, so DomainBed's record holds it
            selected = _select_on_held_out(self, images.device)
        return {**selected, **self.method.update(images, labels)}

    def predict(self, x):
        if not self._held_out_done:
            _select_on_held_out(self, x.device)
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
        _DATASETS[id(hparams)] = (hparams, self, tuple(test_envs))  # held-out data, below

    image_folder.__init__ = __init__
    from domainbed.lib import misc
    _patch_split_dataset(misc)

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


# --- held-out data for methods that select on it -------------------------------------
# A method may define select_on_validation(batches, data_key) and/or
# select_on_test(batches, data_key) (e.g. CALIP's beta search). The adapter calls each
# hook it has once: before the first update for a training-free method (its returned
# numbers then go into DomainBed's results record), else before the first predict.
# train.py splits each environment with misc.split_dataset before it builds the
# algorithm and passes the dataset's hparams dict to the algorithm: the wrapped
# split_dataset remembers every split, the dataset wrapper which dataset and test
# environments belong to which hparams dict. The images are read with the eval
# transform (DomainBed itself evaluates training-env out-splits with augmentation).

SELECTION_HOOKS = (("select_on_validation", "validation"), ("select_on_test", "test"))
HELD_OUT_BATCH_SIZE = 64
_DATASETS = {}    # id(hparams) -> (hparams, dataset, test_envs)
_OUT_SPLITS = {}  # id(split dataset) -> (that dataset, its out-split)


def _patch_split_dataset(misc):
    if getattr(misc.split_dataset, "_clipbench", False):
        return
    upstream = misc.split_dataset

    def split_dataset(dataset, n, seed=0):
        out, in_ = upstream(dataset, n, seed)
        _OUT_SPLITS[id(dataset)] = (dataset, out)
        return out, in_

    split_dataset._clipbench = True
    misc.split_dataset = split_dataset


class _EvalImages(torch.utils.data.Dataset):
    """Chosen images of an image-folder environment, with a fixed transform."""

    def __init__(self, env, indices, transform):
        self.samples = [env.samples[i] for i in indices]
        self.loader, self.transform = env.loader, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(self.loader(path)), label


def held_out_data(hparams, which):
    """(loader, data_key) of what a method may select on, or None when this process
    built no splits for this hparams dict (the algorithm was not built by train.py).
    'validation': the training environments' out-splits (what DomainBed's
    training-domain validation selects on); 'test': every image (in, out and uda
    splits) of the test environments."""
    from algorithms import clip_backbone
    entry = _DATASETS.get(id(hparams))
    if entry is None or entry[0] is not hparams:
        return None
    _, dataset, test_envs = entry
    envs = list(dataset.datasets)
    if which == "validation":
        parts = []
        for i, env in enumerate(envs):
            if i not in test_envs:
                recorded = _OUT_SPLITS.get(id(env))
                if recorded is None:
                    return None
                parts.append((env, recorded[1].keys))
    else:
        parts = [(envs[i], range(len(envs[i]))) for i in test_envs]
    if not parts:
        return None
    transform = clip_backbone.clip_transform(
        clip_backbone.image_size_of(hparams["clip_model"]), train=False)
    views = [_EvalImages(env, indices, transform) for env, indices in parts]
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(views),
                                         batch_size=HELD_OUT_BATCH_SIZE, shuffle=False,
                                         num_workers=dataset.N_WORKERS)
    key = {"harness": "domainbed", "dataset": type(dataset).__name__,
           "split": "out" if which == "validation" else "test_envs",
           "envs": [env.root for env, _ in parts], "transform": repr(transform),
           "items": [sample for view in views for sample in view.samples]}
    return loader, key


def _select_on_held_out(adapter, device) -> dict:
    adapter._held_out_done = True
    summary = {}
    for hook_name, which in SELECTION_HOOKS:
        hook = getattr(adapter.method, hook_name, None)
        if not callable(hook):
            continue
        data = held_out_data(adapter.hparams, which)
        if data is None:
            warnings.warn(f"{adapter.method_cls.name}: no {which} data in this process "
                          f"(not run by DomainBed's train.py?): {hook_name} skipped")
            continue
        loader, key = data
        summary.update(hook(((x.to(device), y.to(device)) for x, y in loader),
                            data_key=key) or {})
    return summary


# --- results ------------------------------------------------------------------------

def _patch_reporting(module):
    from results.records import read_jsonl

    def load_records(path):
        records = []
        for subdir in sorted(os.listdir(path)):
            results_path = os.path.join(path, subdir, "results.jsonl")
            if os.path.isfile(results_path):
                records.extend(read_jsonl(results_path))
        return module.Q(records)

    module.load_records = load_records


# --- a CPU launcher: `--command_launcher local_parallel` --------------------------------
PARALLEL_JOBS_ENV = "CLIPBENCH_PARALLEL_JOBS"  # default: one job per CPU core


def local_parallel_launcher(commands):
    """Run the sweep's commands on this machine, several at a time (default: one per
    core, each with its share of the cores as torch threads). DomainBed's `local`
    launcher runs them one by one: on a CPU most of a short job is Python start-up."""
    import subprocess
    import time
    jobs = max(1, int(os.environ.get(PARALLEL_JOBS_ENV) or os.cpu_count() or 1))
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    pending, running = list(commands), []
    while pending or running:
        running = [p for p in running if p.poll() is None]
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(pending.pop(0), shell=True, env=env))
        time.sleep(0.2)


def _patch_command_launchers(module):
    module.REGISTRY.setdefault("local_parallel", local_parallel_launcher)


_PATCHES = {
    "domainbed.command_launchers": _patch_command_launchers,
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
