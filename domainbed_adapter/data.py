"""DomainBed's image-folder datasets for the harness's algorithms, and the held-out data
of the selection protocol.

For the harness's algorithms (their hparams carry `clip_model`): CLIP preprocessing,
class names from the class folders, input shape from the model. For every algorithm:
a missing dataset folder and an unreadable image name the path, the loader workers
per environment are min(8, CPUs // environments) (CLIPBENCH_NUM_WORKERS overrides), and
a training split smaller than the batch is an error (upstream's loader would spin
forever).

Held-out data: train.py splits each environment with misc.split_dataset before it
builds the algorithm. The wrapped dataset starts the process's job
(domainbed_adapter/job.py), the wrapped split_dataset remembers each training
environment's out-split in it. "validation" = the training environments'
out-splits (what DomainBed's training-domain validation selects on); "test" = every
image (in, out and uda splits) of the test environments. Both are read with the eval
transform. DomainBed itself evaluates training-env out-splits with the training
augmentation; for the harness's algorithms the out-splits it evaluates are read with the
eval transform too, so training-domain validation and in-domain accuracy are not noisy.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from algorithms import backbone
from algorithms.core import selection
from algorithms.core.classnames import classnames_from_folders
from common import cli, env
from domainbed_adapter import job

HELD_OUT_BATCH_SIZE = 64
# set on upstream's objects: a training environment's transform for its held-out images
# (harness algorithms), an open-world test environment's and its in-split's base classes
EVAL_TRANSFORM = "clipbench_eval_transform"
OPEN_BASE_CLASSES = "clipbench_open_base_classes"
OPEN_REST = "clipbench_open_rest_base_classes"


def _checked_loader(loader):
    def load(path):
        try:
            return loader(path)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read image {path}: {cli.image_problem(path, e)}") from None
    return load


def patch_image_folder(module):
    image_folder = module.MultipleEnvironmentImageFolder
    upstream_init = image_folder.__init__

    def __init__(self, root, test_envs, augment, hparams):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"DomainBed dataset folder not found: {root}")
        check_domain_folders(type(self), root)
        try:
            upstream_init(self, root, test_envs, augment, hparams)
        except FileNotFoundError as e:  # torchvision: no class folder, or an empty class
            raise FileNotFoundError(empty_folder_problem(root) or str(e)) from None
        # for every algorithm: label k must be the same class in every domain
        class_names = classnames_from_folders(
            [environment.classes for environment in self.datasets], where=root,
            domains=[os.path.basename(os.path.normpath(e.root)) for e in self.datasets])
        # upstream's 8 per environment oversubscribes a small node (common/env.py)
        self.N_WORKERS = env.workers_per_environment(len(self.datasets))
        for environment in self.datasets:
            environment.loader = _checked_loader(environment.loader)
        if "clip_model" not in hparams:  # not a harness algorithm: upstream behaviour
            return
        self.clipbench_class_names = class_names
        size = backbone.image_size_of(hparams["clip_model"])
        for i, environment in enumerate(self.datasets):
            environment.transform = backbone.clip_transform(
                size, train=augment and i not in test_envs)
            if i not in test_envs:  # its held-out images are evaluated without augmentation
                setattr(environment, EVAL_TRANSFORM, backbone.clip_transform(size, train=False))
        self.input_shape = (3, size, size)
        job.dataset_built(self, test_envs, hparams)

    image_folder.__init__ = __init__


def check_domain_folders(dataset_cls, root) -> None:
    """As many domain folders under root as the dataset has environments (upstream takes
    whatever folders are there, in sorted order: one missing would shift every index)."""
    expected = getattr(dataset_cls, "ENVIRONMENTS", None)
    found = sorted(f.name for f in os.scandir(root) if f.is_dir())
    if expected and len(found) != len(expected):
        raise FileNotFoundError(
            f"{root}: {len(found)} domain folder(s) ({', '.join(found) or 'none'}), but "
            f"{dataset_cls.__name__} has {len(expected)} domains ({', '.join(expected)}): "
            f"a missing or extra folder would shift every domain index")


def empty_folder_problem(root):
    """The first domain folder without class folders or class folder without an image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    for domain in sorted(f.path for f in os.scandir(root) if f.is_dir()):
        classes = sorted(f.path for f in os.scandir(domain) if f.is_dir())
        if not classes:
            return f"{domain}: no class folders in this domain folder"
        for folder in classes:
            if not any(name.lower().endswith(IMG_EXTENSIONS)
                       for _, _, names in os.walk(folder) for name in names):
                return (f"{folder}: no image in this class folder (an empty class; image "
                        f"files end in {', '.join(IMG_EXTENSIONS)})")
    return None


def remember_splits(misc):
    upstream = misc.split_dataset

    def split_dataset(dataset, n, seed=0):
        if hasattr(dataset, OPEN_BASE_CLASSES):
            out, in_ = _split_open_test_env(misc, dataset, n, seed)
        elif hasattr(dataset, OPEN_REST):
            return _split_open_classes(misc, dataset)
        else:
            out, in_ = upstream(dataset, n, seed)
            if hasattr(dataset, EVAL_TRANSFORM):
                out = _EvalImages(dataset, out.keys, getattr(dataset, EVAL_TRANSFORM))
        running = job.current()
        index = running.environment_index(dataset) if running else None
        if index is not None:
            running.out_splits[index] = out
        return out, in_

    misc.split_dataset = split_dataset


# --- open-world test environments (domainbed_adapter/open_world.py) ------------------
# train.py splits a test environment twice: (out, in) = split(env, holdout), then
# (uda, in) = split(in, uda_holdout). For an open-world variant's test environment the
# first split holds out the same fraction of its base-class images only (the oracle's
# test-domain validation set), and the second puts every open-class image into `uda`:
# `env<t>_in_acc` is then the test domain's base-class accuracy, `env<k>_uda_acc` (k-th
# test environment) its open-class accuracy, both classified among all classes. DomainBed's
# model selection never reads uda keys.

def mark_open_test_env(environment, base_classes: int) -> None:
    setattr(environment, OPEN_BASE_CLASSES, base_classes)


def _label(dataset, index) -> int:
    if hasattr(dataset, "samples"):
        return int(dataset.samples[index][1])
    return _label(dataset.underlying_dataset, dataset.keys[index])


def _split_open_test_env(misc, environment, n, seed):
    base_classes = getattr(environment, OPEN_BASE_CLASSES)
    base = [i for i in range(len(environment)) if _label(environment, i) < base_classes]
    opened = [i for i in range(len(environment)) if _label(environment, i) >= base_classes]
    np.random.RandomState(seed).shuffle(base)
    n_base = int(len(base) * n / max(1, len(environment)))  # the same holdout fraction
    out = misc._SplitDataset(environment, base[:n_base])
    in_ = misc._SplitDataset(environment, base[n_base:] + opened)
    setattr(in_, OPEN_REST, base_classes)
    return out, in_


def _split_open_classes(misc, in_split):
    base_classes = getattr(in_split, OPEN_REST)
    labels = [_label(in_split, i) for i in range(len(in_split))]
    uda = misc._SplitDataset(in_split, [i for i, y in enumerate(labels) if y >= base_classes])
    rest = misc._SplitDataset(in_split, [i for i, y in enumerate(labels) if y < base_classes])
    return uda, rest


def refuse_small_splits(module):
    upstream_init = module.InfiniteDataLoader.__init__

    def __init__(self, dataset, weights, batch_size, num_workers):
        if weights is None and len(dataset) < batch_size:
            raise ValueError(f"the training split of {_where(dataset)} holds {len(dataset)} "
                             f"images, fewer than batch_size={batch_size}: DomainBed's loader "
                             f"would spin forever (a smaller batch_size in --hparams, or more "
                             f"images)")
        upstream_init(self, dataset, weights, batch_size, num_workers)

    module.InfiniteDataLoader.__init__ = __init__


def _where(split) -> str:
    """The folder of the environment a split was drawn from ('an environment' if none)."""
    while split is not None and not hasattr(split, "root"):
        split = getattr(split, "underlying_dataset", None)
    return getattr(split, "root", None) or "an environment"


class _EvalImages(torch.utils.data.Dataset):
    """Chosen images (`keys`) of an image-folder environment read with a fixed transform,
    shaped like misc._SplitDataset: the training domains' out-splits read without
    augmentation (upstream reads them with the training augmentation) and the held-out
    data of the selection protocol."""

    def __init__(self, environment, keys, transform):
        self.underlying_dataset, self.keys, self.transform = environment, list(keys), transform

    @property
    def samples(self):
        return [self.underlying_dataset.samples[k] for k in self.keys]

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        path, label = self.underlying_dataset.samples[self.keys[index]]
        return self.transform(self.underlying_dataset.loader(path)), label


def held_out_data(running, which):
    """(loader, data_key) of the `which` data (selection.VALIDATION or TEST) of a
    DomainBed job (domainbed_adapter/job.py), or None when there is no job or it built no
    splits (the algorithm was not built by train.py)."""
    if running is None:
        return None
    dataset, test_envs = running.dataset, running.test_envs
    environments = list(dataset.datasets)
    if which == selection.VALIDATION:
        parts = []
        for i, environment in enumerate(environments):
            if i not in test_envs:
                recorded = running.out_splits.get(i)
                if recorded is None:
                    return None
                parts.append((environment, recorded.keys))
    else:
        parts = [(environments[i], range(len(environments[i]))) for i in test_envs]
    if not parts:
        return None
    transform = backbone.clip_transform(backbone.image_size_of(running.hparams["clip_model"]),
                                        train=False)
    views = [_EvalImages(environment, indices, transform) for environment, indices in parts]
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(views),
                                         batch_size=HELD_OUT_BATCH_SIZE, shuffle=False,
                                         num_workers=dataset.N_WORKERS)
    key = {"harness": "domainbed", "dataset": type(dataset).__name__,
           "split": "out" if which == selection.VALIDATION else "test_envs",
           "envs": [environment.root for environment, _ in parts], "transform": repr(transform),
           "items": [sample for view in views for sample in view.samples]}
    return loader, key
