"""Dassl adapter: one TrainerX per harness method, registered under the method's name.

Config, merged in this order (yacs; printed at start by Dassl):
1. Dassl's and CoOp's defaults, plus the harness's nodes: `CLIP.MODEL` / `CLIP.PRETRAINED`
   (the backbone every harness trainer uses), `TRAINER.<NAME>` for every method, one
   upper-case key per declared hyperparameter with its declared default, overridden by
   the recipe book's Dassl values (recipes/recipes.yaml: e.g. CLIPood's BMA beta for CoOp
   tasks), and `HARNESS.PROTOCOL` / `HARNESS.STAGE` (what the run's record says it is:
   "dassl" / "test" for a plain run; sweeps/coop_protocols.py sets them);
2. `--dataset-config-file`, `--config-file` (a backbone: trainers/configs/backbones/), opts.
`TRAINER.<NAME>.CLIP_MODEL` / `CLIP_PRETRAINED` are empty (null) unless set: then the
method uses `CLIP.MODEL` / `CLIP.PRETRAINED`. The method's config is built from
`TRAINER.<NAME>` by algorithms/core/config.py `build_config`; its JobContext from the
run (class names, epochs x batches, DATALOADER.TRAIN_X.BATCH_SIZE images per step).
Outputs: besides the `* accuracy: X%` lines CoOp's parse_test_res.py reads, every
test writes `<OUTPUT_DIR>/results.json` with the run's facts (common/run_facts.py).
"""
from __future__ import annotations

import os
import random

import torch
from dassl.engine import TRAINER_REGISTRY, TrainerX
from yacs.config import CfgNode as CN

import recipes
from algorithms import backbone
from algorithms.core import nonfinite, registry, selection
from algorithms.core.config import as_dict, build_config
from algorithms.core.context import JobContext
from algorithms.core.method import NonFiniteLoss
from common.files import write_json_atomic
from common.run_facts import run_facts

COOP_TEMPLATES = "coop"  # Dassl default: CoOp's per-dataset template (trainers/zsclip.py)
FROM_BACKBONE = {"clip_model": "MODEL", "clip_pretrained": "PRETRAINED"}  # cfg.CLIP.<KEY>
DEFAULT_PROTOCOL, DEFAULT_STAGE = "dassl", "test"


def add_method_configs(cfg) -> None:
    """Declare cfg.CLIP, cfg.HARNESS and cfg.TRAINER.<NAME> for every harness method
    (before any YAML merge), with the recipe book's Dassl values as defaults."""
    cfg.CLIP = CN({"MODEL": backbone.DEFAULT_MODEL, "PRETRAINED": backbone.DEFAULT_PRETRAINED})
    cfg.HARNESS = CN({"PROTOCOL": DEFAULT_PROTOCOL, "STAGE": DEFAULT_STAGE})
    for name, method_cls in registry.methods().items():
        book = recipes.method_values(name, "dassl")
        node = CN()
        for key, hp in method_cls.hparams().items():
            node[key.upper()] = None if key in FROM_BACKBONE else book.get(key, hp.default)
        if "TEMPLATES" in node and "templates" not in book:
            node.TEMPLATES = COOP_TEMPLATES
        cfg.TRAINER[name.upper()] = node


def method_config(cfg, method_cls):
    """The method's typed config from TRAINER.<NAME> (and CLIP.* for the backbone)."""
    node = cfg.TRAINER[method_cls.name.upper()]
    values = {}
    for key in method_cls.hparams():
        if key in FROM_BACKBONE and node[key.upper()] is None:
            values[key] = cfg.CLIP[FROM_BACKBONE[key]]
        else:
            values[key] = node[key.upper()]
    if values.get("templates") == COOP_TEMPLATES:
        values["templates"] = coop_template(cfg.DATASET.NAME)
    return build_config(method_cls, values, f"TRAINER.{method_cls.name.upper()}")


def prompt_classnames(classnames) -> list:
    """Class names as CoOp's trainers put them into prompts: underscores become spaces
    (CoOp's datasets keep e.g. 'american_bulldog'; trainers/zsclip.py, coop.py replace)."""
    return [name.replace("_", " ") for name in classnames]


def coop_template(dataset_name: str) -> str:
    """CoOp's per-dataset template (its trainers/zsclip.py CUSTOM_TEMPLATES), where CoOp's
    trainers are importable (trainers/upstream_patches.open_upstream), else 'photo'."""
    try:
        from trainers import zsclip  # CoOp's
    except ImportError:
        return "photo"
    return getattr(zsclip, "CUSTOM_TEMPLATES", {}).get(dataset_name, "photo")


def test_and_write_record(trainer, run_test, split=None, selection=None):
    """Run Dassl's test and write `<OUTPUT_DIR>/results.json` with the evaluator's
    metrics (a file with a schema, not a log line to scrape). Used for every trainer,
    CoOp's own included (trainers/upstream_patches.py)."""
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
    model = getattr(trainer, "model", None)
    method_cfg = getattr(model, "cfg", None)
    backbone_name = method_cfg.clip_model if method_cfg is not None else cfg.MODEL.BACKBONE.NAME
    precision = run_precision(trainer)
    harness = cfg.get("HARNESS") or CN({"PROTOCOL": DEFAULT_PROTOCOL, "STAGE": DEFAULT_STAGE})
    record = {
        "kind": "dassl", "trainer": cfg.TRAINER.NAME, "dataset": cfg.DATASET.NAME,
        "subsample_classes": cfg.DATASET.SUBSAMPLE_CLASSES,
        "num_shots": cfg.DATASET.NUM_SHOTS, "seed": cfg.SEED,
        "split": "val" if val else "test", "num_classes": trainer.num_classes,
        "backbone": backbone_name,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "precision": precision,
        "run": run_facts(
            protocol=harness.PROTOCOL, stage=harness.STAGE, method=cfg.TRAINER.NAME,
            config=as_dict(method_cfg) if method_cfg is not None else _trainer_node(cfg),
            precision=precision, backbone=backbone_name,
            weights_digest=getattr(model, "weights_digest", None), dataset=cfg.DATASET.NAME,
            seeds={"seed": cfg.SEED}, steps=getattr(trainer, "clipbench_steps", None)),
    }
    if selection:
        record["selection"] = selection
    write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "results.json"), record)
    return first


def _trainer_node(cfg) -> dict:
    """An upstream trainer's TRAINER.<NAME> node, as plain JSON values."""
    node = cfg.TRAINER.get(str(cfg.TRAINER.NAME).upper())
    return {k: v for k, v in (node or {}).items()
            if isinstance(v, (str, int, float, bool, type(None)))}


def run_precision(trainer):
    """The precision the run's model ran at: a harness method's resolved `precision`
    (bf16 | fp16 | fp32), else CoOp's TRAINER.<NAME>.PREC (fp16 | fp32 | amp), else None."""
    resolved = getattr(getattr(trainer, "model", None), "precision", None)
    if isinstance(resolved, str):
        return resolved
    node = trainer.cfg.TRAINER.get(str(trainer.cfg.TRAINER.NAME).upper())
    return node.get("PREC") if node is not None else None


class CLIPMethodTrainer(TrainerX):
    method_cls = None

    def check_cfg(self, cfg):
        model = method_config(cfg, self.method_cls).clip_model
        size = backbone.image_size_of(model)
        if tuple(cfg.INPUT.SIZE) != (size, size):
            raise ValueError(f"INPUT.SIZE {tuple(cfg.INPUT.SIZE)} does not match "
                             f"{model}'s image size {size}")

    def build_model(self):
        cfg = method_config(self.cfg, self.method_cls)
        print(f"Building {self.method_cls.name} with {cfg}")
        classnames, data = self.dm.dataset.classnames, self.dm.dataset
        trained = {item.label for item in data.train_x}
        labels = trained.union(range(self.num_classes),
                               (item.label for item in (data.val or []) + (data.test or [])))
        if labels - trained or len(classnames) != len(labels):
            # Dassl names (and counts) only the classes of the training split
            raise ValueError(f"{self.cfg.DATASET.NAME}: {len(classnames)} class names for "
                             f"{len(labels)} classes: label(s) {sorted(labels - trained)[:10]} "
                             f"have no training image (an empty class)")
        self.clipbench_steps = max(1, self.max_epoch * len(self.train_loader_x))
        context = JobContext.build(cfg, prompt_classnames(classnames),
                                   total_steps=self.clipbench_steps,
                                   images_per_step=self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE,
                                   device=self.device, where=self.method_cls.name)
        self.model = self.method_cls(cfg, context)
        self.model.to(self.device)
        if self.method_cls.trains:
            # Dassl checkpoints the method's training state (optimiser, schedule, scaler)
            # beside its weights; the method steps its schedule itself
            self.register_model("model", self.model, self.model.training_state, None)
        elif not self.method_cls.reads_training_data:
            self.max_epoch = 0  # nothing to train: train() goes straight to the test
        # else: training-free, but update() reads the training set (Tip-Adapter's cache)

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        try:
            summary = self.model.update(images, labels)
        except NonFiniteLoss as e:  # one line, no checkpoint, no results.json
            step = self.epoch * self.num_batches + self.batch_idx
            raise nonfinite.stopped(e, f"epoch {self.epoch + 1}, batch {self.batch_idx + 1} "
                                       f"(step {step})") from None
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return summary

    def get_current_lr(self, names=None):
        """Dassl logs the first model's lr; a method with no optimiser has none (0)."""
        return super().get_current_lr(names) if self.get_model_names() else 0.0

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
            checkpoint = backbone.load_checkpoint(path, self.device, f"{self.method_cls.name} "
                                                                     f"checkpoint")
            try:
                self._models[name].load_state_dict(checkpoint["state_dict"])
            except (RuntimeError, KeyError, TypeError) as e:
                raise backbone.CheckpointError(
                    f"cannot load {path} into {self.method_cls.name}: "
                    f"{backbone.checkpoint_problem(e, self.method_cls.name)}") from None
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
