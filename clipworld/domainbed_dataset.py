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
        folder = os.path.join(root, DOMAINBED_DIRNAME)
        missing = [d for d in sorted(DOMAINS) if not os.path.isdir(os.path.join(folder, d))]
        if os.path.isdir(folder) and missing:  # (no folder at all: the image folder says so)
            raise FileNotFoundError(f"{NAME}: missing domain folder "
                                    f"{os.path.join(folder, missing[0])} (domains: "
                                    f"{', '.join(sorted(DOMAINS))})")
        image_folder.__init__(self, folder, test_envs, hparams["data_augmentation"], hparams)

    dataset_cls = type(NAME, (image_folder,), {
        "__init__": __init__, "ENVIRONMENTS": sorted(DOMAINS), "CHECKPOINT_FREQ": 100,
        "__module__": datasets_module.__name__})
    setattr(datasets_module, NAME, dataset_cls)
    if NAME not in datasets_module.DATASETS:
        datasets_module.DATASETS.append(NAME)
