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
        except OSError as e:
            raise FileNotFoundError(f"CLIPWorld: cannot read {split_path} ({e}); generate the "
                                    f"world: python -m clipworld.generate --root <dir>") from None
        except ValueError as e:
            raise ValueError(f"CLIPWorld: {split_path} is not JSON ({e}): a truncated or "
                             f"corrupt split file; generate the world again") from None
        check_split(split, split_path)
        source = list(cfg.DATASET.SOURCE_DOMAINS) or self.domains
        target = list(cfg.DATASET.TARGET_DOMAINS) or self.domains
        self.check_input_domains(source, target)
        train = self.read_items(split["train"], source, split_path)
        val = self.read_items(split["val"], source, split_path)
        test = self.read_items(split["test"], target, split_path)
        for key, items, kept in (("train", train, source), ("val", val, source),
                                 ("test", test, target)):
            if not items:
                raise ValueError(f"CLIPWorld: {split_path}: '{key}' has no image of the "
                                 f"domains {', '.join(kept)}")

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


def check_split(split, split_path) -> None:
    """{train, val, test}: non-empty lists of [image path, integer label, class name,
    domain]."""
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list)
                                              for k in ("train", "val", "test")):
        raise ValueError(f"CLIPWorld: {split_path}: not a split file (needs lists 'train', "
                         f"'val' and 'test')")
    for key in ("train", "val", "test"):
        if not split[key]:  # Dassl would fail on it later, naming no file
            raise ValueError(f"CLIPWorld: {split_path}: '{key}' is empty; generate the world "
                             f"again (at least 3 images per class and domain)")
        for i, row in enumerate(split[key]):
            ok = (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
                  and isinstance(row[1], int) and not isinstance(row[1], bool)
                  and row[1] >= 0 and isinstance(row[2], str) and row[3] in DOMAINS)
            if not ok:
                raise ValueError(f"CLIPWorld: {split_path}: {key}[{i}] is {row!r}, expected "
                                 f"[image path, label, class name, domain] with a domain of "
                                 f"{', '.join(DOMAINS)}")


def register() -> None:
    if "CLIPWorld" not in DATASET_REGISTRY.registered_names():
        DATASET_REGISTRY.register(CLIPWorld)
