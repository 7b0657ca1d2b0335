"""Dassl adapter: one TrainerX per harness method, registered under the method's name.

Config, merged in this order (yacs; printed at start by Dassl):
1. Dassl's and CoOp's defaults, plus the harness's nodes: `CLIP.MODEL` / `CLIP.PRETRAINED`
   (the backbone every harness trainer uses) and `TRAINER.<NAME>` for every method, one
   upper-case key per declared hyperparameter with its declared default;
2. `trainers/configs/methods/<Name>.yaml`, only for a method whose Dassl defaults differ
   from its declared ones (e.g. CLIPood's BMA beta for CoOp tasks);
3. `--dataset-config-file`, `--config-file` (a backbone: trainers/configs/backbones/), opts.
`TRAINER.<NAME>.CLIP_MODEL` / `CLIP_PRETRAINED` are empty (null) unless set: then the
method uses `CLIP.MODEL` / `CLIP.PRETRAINED`.
Outputs: besides the `* accuracy: X%` lines CoOp's parse_test_res.py reads, every
test writes `<OUTPUT_DIR>/results.json`.
"""
from __future__ import annotations

import os
import pickle
import random
import sys

import torch
import yaml
from dassl.engine import TRAINER_REGISTRY, TrainerX
from yacs.config import CfgNode as CN

from algorithms import backbone
from algorithms.core import registry, selection
from common.files import write_json_atomic
from common.paths import TRAINER_CONFIGS

COOP_TEMPLATES = "coop"  # Dassl default: CoOp's per-dataset template (trainers/zsclip.py)
FROM_DASSL = ("batch_size", "total_steps")  # set by Dassl's own config, not TRAINER.<NAME>
FROM_BACKBONE = {"clip_model": "MODEL", "clip_pretrained": "PRETRAINED"}  # cfg.CLIP.<KEY>
METHOD_CONFIGS = TRAINER_CONFIGS / "methods"


def add_method_configs(cfg) -> None:
    """Declare cfg.CLIP and cfg.TRAINER.<NAME> for every harness method (before any
    YAML merge), with the method's own Dassl defaults where it has a file for them."""
    cfg.CLIP = CN({"MODEL": backbone.DEFAULT_MODEL, "PRETRAINED": backbone.DEFAULT_PRETRAINED})
    for name, method_cls in registry.methods().items():
        node = CN()
        for key, hp in method_cls.hparams().items():
            if key in FROM_BACKBONE:
                node[key.upper()] = None
            elif key not in FROM_DASSL:
                node[key.upper()] = hp.default
        if "TEMPLATES" in node:
            node.TEMPLATES = COOP_TEMPLATES
        cfg.TRAINER[name.upper()] = node
        own = METHOD_CONFIGS / f"{name}.yaml"
        if own.is_file():
            merge_method_defaults(cfg, name, own)


def merge_method_defaults(cfg, name: str, path) -> None:
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    allowed = {"TRAINER": {name.upper()}}
    if set(content) - set(allowed) or set(content.get("TRAINER", {})) - allowed["TRAINER"]:
        raise ValueError(f"{path}: a method's file may only set TRAINER.{name.upper()}.*")
    cfg.TRAINER[name.upper()].merge_from_other_cfg(CN(content["TRAINER"][name.upper()]))


def method_hparams(cfg, method_cls, total_steps: int = 1) -> dict:
    node = cfg.TRAINER[method_cls.name.upper()]
    derived = {"batch_size": cfg.DATALOADER.TRAIN_X.BATCH_SIZE, "total_steps": total_steps}
    hparams = {}
    for key in method_cls.hparams():
        if key in FROM_DASSL:
            hparams[key] = derived[key]
        elif key in FROM_BACKBONE and node[key.upper()] is None:
            hparams[key] = cfg.CLIP[FROM_BACKBONE[key]]
        else:
            hparams[key] = node[key.upper()]
    if hparams.get("templates") == COOP_TEMPLATES:
        hparams["templates"] = coop_template(cfg.DATASET.NAME)
    return hparams


def prompt_classnames(classnames) -> list:
    """Class names as CoOp's trainers put them into prompts: underscores become spaces
    (CoOp's datasets keep e.g. 'american_bulldog'; trainers/zsclip.py, coop.py replace)."""
    return [name.replace("_", " ") for name in classnames]


def coop_template(dataset_name: str) -> str:
    coop_zsclip = sys.modules.get("trainers.zsclip") or sys.modules.get("coop.trainers.zsclip")
    templates = getattr(coop_zsclip, "CUSTOM_TEMPLATES", {})
    return templates.get(dataset_name, "photo")


def test_and_write_record(trainer, run_test, split=None, selection=None):
    """Run Dassl's test and write `<OUTPUT_DIR>/results.json` with the evaluator's
    metrics (a file with a schema, not a log line to scrape). Used for every trainer,
    CoOp's own included (trainers/coop_runner.py)."""
    metrics, evaluate = {}, trainer.evaluator.evaluate

    def evaluate_and_keep():
        results = evaluate()
        metrics.update(results)
        return results

    trainer.evaluator.evaluate = evaluate_and_keep
    try:
        first = run_test()
    finally:
        trainer.evaluator.evaluate = evaluate
    cfg = trainer.cfg
    # Dassl's test falls back to the test split when there is no val loader
    val = (split or cfg.TEST.SPLIT) == "val" and trainer.val_loader is not None
    record = {
        "kind": "dassl", "trainer": cfg.TRAINER.NAME, "dataset": cfg.DATASET.NAME,
        "subsample_classes": cfg.DATASET.SUBSAMPLE_CLASSES,
        "num_shots": cfg.DATASET.NUM_SHOTS, "seed": cfg.SEED,
        "split": "val" if val else "test", "num_classes": trainer.num_classes,
        "backbone": getattr(getattr(trainer, "model", None), "hp", {}).get(
            "clip_model", cfg.MODEL.BACKBONE.NAME),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    if selection:
        record["selection"] = selection
    write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "results.json"), record)
    return first


class CLIPMethodTrainer(TrainerX):
    method_cls = None

    def check_cfg(self, cfg):
        model = method_hparams(cfg, self.method_cls)["clip_model"]
        size = backbone.image_size_of(model)
        if tuple(cfg.INPUT.SIZE) != (size, size):
            raise ValueError(f"INPUT.SIZE {tuple(cfg.INPUT.SIZE)} does not match "
                             f"{model}'s image size {size}")

    def build_model(self):
        total_steps = max(1, self.max_epoch * len(self.train_loader_x))
        hparams = method_hparams(self.cfg, self.method_cls, total_steps)
        print(f"Building {self.method_cls.name} with {hparams}")
        self.model = self.method_cls(prompt_classnames(self.dm.dataset.classnames), hparams,
                                     device=self.device)
        self.model.to(self.device)
        if self.method_cls.trains:
            # the method steps its own optimizer and per-step schedule
            self.register_model("model", self.model, self.model.optimizer, None)
        else:
            self.max_epoch = 0  # nothing to train: train() goes straight to the test

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        summary = self.model.update(images, labels)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    def parse_batch_train(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def model_inference(self, images):
        return self.model.predict(images)

    def resume_model_if_exist(self, directory):
        if not self.get_model_names():  # Dassl's version fails with no registered model
            return 0
        return super().resume_model_if_exist(directory)

    def load_model(self, directory, epoch=None):
        """Dassl's layout (<dir>/<name>/model.pth.tar-<epoch> or model-best.pth.tar),
        loaded with weights_only=True; class-dependent buffers are rebuilt, not loaded."""
        if not self.get_model_names():
            print(f"{self.method_cls.name} has no trained weights: nothing to load")
            return
        if not directory:
            raise FileNotFoundError(f"{self.method_cls.name} needs --model-dir to evaluate")
        filename = "model-best.pth.tar" if epoch is None else f"model.pth.tar-{epoch}"
        for name in self.get_model_names():
            path = os.path.join(directory, name, filename)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no checkpoint at {path}")
            try:
                checkpoint = torch.load(path, map_location=self.device, weights_only=True)
                self._models[name].load_state_dict(checkpoint["state_dict"])
            except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
                raise RuntimeError(f"cannot load {path} into {self.method_cls.name}: "
                                   f"{str(e).strip().splitlines()[0]}") from None
            print(f"Loaded {path} (epoch {checkpoint.get('epoch')})")

    @torch.no_grad()
    def test(self, split=None):
        selected = self.select_on_held_out()
        return test_and_write_record(self, lambda: super(CLIPMethodTrainer, self).test(split),
                                     split, selected)

    # Selection (algorithms/core/selection.py): before every test, a method that declares
    # `selects_on` selects on Dassl's val loader ("validation") or test loader ("test");
    # what it returns goes into results.json as "selection". Where a dataset's val split
    # is its test split (CoOp's ImageNet), validation uses up to VAL_FROM_TRAIN_PER_CLASS
    # training images per class instead, read with the test transform.
    SPLIT_OF = {selection.VALIDATION: "val", selection.TEST: "test"}
    VAL_FROM_TRAIN_PER_CLASS = 16

    def select_on_held_out(self) -> dict:
        def provide(which):
            loader, split = self.held_out_loader(self.SPLIT_OF[which])
            if loader is None:
                return None
            data = loader.dataset
            key = {"harness": "dassl", "dataset": self.cfg.DATASET.NAME, "split": split,
                   "transform": repr(data.transform),
                   "items": [(item.impath, item.label) for item in data.data_source]}
            return (self.parse_batch_test(batch) for batch in loader), key, split

        return selection.run(self.model, provide)

    def held_out_loader(self, split):
        if split == "test" or self.val_loader is None:
            return (self.test_loader if split == "test" else None), split
        paths = lambda loader: [item.impath for item in loader.dataset.data_source]  # noqa: E731
        if self.test_loader is None or paths(self.val_loader) != paths(self.test_loader):
            return self.val_loader, split
        from dassl.data.data_manager import build_data_loader
        rng, per_class = random.Random(self.cfg.SEED), {}
        for item in self.dm.dataset.train_x:
            per_class.setdefault(item.label, []).append(item)
        shots = self.VAL_FROM_TRAIN_PER_CLASS
        items = [item for label in sorted(per_class) for item in (
            per_class[label] if len(per_class[label]) <= shots else rng.sample(per_class[label], shots))]
        print(f"{self.method_cls.name}: {self.cfg.DATASET.NAME}'s val split is its test split: "
              f"selecting on {len(items)} training images instead")
        loader = build_data_loader(self.cfg, data_source=items,
                                   batch_size=self.cfg.DATALOADER.TEST.BATCH_SIZE,
                                   tfm=self.test_loader.dataset.transform, is_train=False)
        return loader, "train_as_val"


def register_trainers() -> None:
    for name, method_cls in registry.methods().items():
        if name not in TRAINER_REGISTRY.registered_names():
            trainer = type(name, (CLIPMethodTrainer,), {"method_cls": method_cls,
                                                        "__module__": __name__})
            TRAINER_REGISTRY.register(trainer)
