"""DomainBed's `--hparams` for the harness's algorithms: a key no one reads or a value
of the wrong JSON type is an error naming the known keys or the expected type (upstream's
train.py merges the JSON into the hyperparameters and ignores what nothing reads).

Known keys for (algorithm, dataset): what the registry defines for them (upstream's
generic ones such as `data_augmentation`, the method's declared ones) plus the keys the
adapter's datasets read (`DATASET_KEYS`). Types: each default's JSON type
(algorithms/core/hparams.py `check_overrides`). Checked where train.py first asks the
registry for the job's hyperparameters, before anything is built; other callers of the
registry and upstream's own algorithms are unchanged."""
from __future__ import annotations

import json

from algorithms.core import registry
from algorithms.core.hparams import check_overrides
from domainbed_adapter import job
# read from hparams by domainbed_adapter/job.py for datasets that do not give them, not
# declared by a method; the value stands for the JSON type
DATASET_KEYS = {
    "class_names": [],    # class names for a dataset without class folders (MNIST, Debug)
    "train_classes": 0,   # train on the first N classes only (open-world variants set it)
}
OPEN_WORLD_KEYS = {"open_ratio": 0.5}  # <Name>Open datasets only


def train_overrides(algorithm: str, dataset: str):
    """The parsed `--hparams` of train.py when this process is train.py running
    (algorithm, dataset); None otherwise or when it has none."""
    args = job.train_args()
    if args is None or (args.algorithm, args.dataset) != (algorithm, dataset) or not args.hparams:
        return None
    try:
        return json.loads(args.hparams)
    except ValueError as e:
        raise ValueError(f"--hparams is not valid JSON ({e})") from None


def known_keys(dataset: str, hparams: dict) -> dict:
    """{key: default} a job of `dataset` reads; `hparams`: the registry's (default,
    random) pairs for it."""
    from domainbed_adapter import open_world
    known = {key: pair[0] for key, pair in hparams.items()}
    known.update(DATASET_KEYS)
    if dataset.endswith(open_world.SUFFIX):
        known.update(OPEN_WORLD_KEYS)
    return known


def patch_registry(module) -> None:
    """Wrap hparams_registry._hparams: for a harness algorithm in train.py, check the
    job's --hparams against what the registry defines."""
    upstream = module._hparams

    def _hparams(algorithm, dataset, random_seed):
        hparams = upstream(algorithm, dataset, random_seed)
        if algorithm in registry.methods():
            overrides = train_overrides(algorithm, dataset)
            if overrides is not None:
                check_overrides(overrides, known_keys(dataset, hparams),
                                f"--hparams for {algorithm} on {dataset}")
        return hparams

    module._hparams = _hparams
