"""The generated world (clipworld/generate.py) as a Dassl dataset, `DATASET.NAME: CLIPWorld`.

Reads `<DATASET.ROOT>/clip_world/split_clip_world.json` ({train, val, test}: [path,
label, class, domain]). DATASET.SOURCE_DOMAINS keeps those domains in train/val and
DATASET.TARGET_DOMAINS in test (empty: every domain). Few-shot sampling (NUM_SHOTS) and
base/new subsampling (SUBSAMPLE_CLASSES) are Dassl's and CoOp's own, as for CoOp's datasets.
"""
from __future__ import annotations

import json
import os

from dassl.data.datasets import DATASET_REGISTRY, DatasetBase, Datum

from clipworld.generate import DOMAINS

SPLIT_FILE = "split_clip_world.json"


class CLIPWorld(DatasetBase):
    dataset_dir = "clip_world"
    domains = list(DOMAINS)

    def __init__(self, cfg):
        self.dataset_dir = os.path.join(os.path.abspath(os.path.expanduser(cfg.DATASET.ROOT)),
                                        type(self).dataset_dir)
        self.image_dir = os.path.join(self.dataset_dir, "images")
        split_path = os.path.join(self.dataset_dir, SPLIT_FILE)
        try:
            with open(split_path) as f:
                split = json.load(f)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"CLIPWorld: cannot read {split_path} ({e}); generate the "
                                    f"world: python -m clipworld.generate --root <dir>") from None
        source = list(cfg.DATASET.SOURCE_DOMAINS) or self.domains
        target = list(cfg.DATASET.TARGET_DOMAINS) or self.domains
        self.check_input_domains(source, target)
        train = self.read_items(split["train"], source, split_path)
        val = self.read_items(split["val"], source, split_path)
        test = self.read_items(split["test"], target, split_path)

        shots = cfg.DATASET.NUM_SHOTS
        if shots >= 1:  # seeded by Dassl's set_random_seed(cfg.SEED)
            train = self.generate_fewshot_dataset(train, num_shots=shots)
            val = self.generate_fewshot_dataset(val, num_shots=min(shots, 4))
        from datasets.oxford_pets import OxfordPets  # CoOp's base/new split, on CoOp's path
        train, val, test = OxfordPets.subsample_classes(
            train, val, test, subsample=cfg.DATASET.SUBSAMPLE_CLASSES)
        super().__init__(train_x=train, val=val, test=test)

    def read_items(self, items, domains, split_path):
        out = []
        for path, label, classname, domain in items:
            if domain not in domains:
                continue
            impath = os.path.join(self.image_dir, path)
            if not os.path.isfile(impath):
                raise FileNotFoundError(f"CLIPWorld: missing image {impath} (listed in {split_path})")
            out.append(Datum(impath=impath, label=int(label), domain=self.domains.index(domain),
                             classname=classname))
        return out


def register() -> None:
    if "CLIPWorld" not in DATASET_REGISTRY.registered_names():
        DATASET_REGISTRY.register(CLIPWorld)
