"""CLIPWorld as a DomainBed image-folder dataset: `--dataset CLIPWorld`, read from
`<data_dir>/clip_world/<domain>/<class>/`, one environment per domain."""
from __future__ import annotations

import os

from clipworld.generate import DOMAINBED_DIRNAME, DOMAINS

NAME = "CLIPWorld"


def register(datasets_module) -> None:
    """Add the class to domainbed.datasets and to its DATASETS list."""
    image_folder = datasets_module.MultipleEnvironmentImageFolder

    def __init__(self, root, test_envs, hparams):
        image_folder.__init__(self, os.path.join(root, DOMAINBED_DIRNAME), test_envs,
                              hparams["data_augmentation"], hparams)

    dataset_cls = type(NAME, (image_folder,), {
        "__init__": __init__, "ENVIRONMENTS": sorted(DOMAINS), "CHECKPOINT_FREQ": 100,
        "__module__": datasets_module.__name__})
    setattr(datasets_module, NAME, dataset_cls)
    if NAME not in datasets_module.DATASETS:
        datasets_module.DATASETS.append(NAME)
