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
from dassl.engine import TRAINER_REGISTRY, TrainerX
from yacs.config import CfgNode as CN

from algorithms import backbone
from algorithms.core import nonfinite, registry, selection
from common import cli
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
    content = cli.read_yaml_mapping(path, f"{name}'s Dassl defaults")
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
        "precision": run_precision(trainer),
    }
    if selection:
        record["selection"] = selection
    write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "results.json"), record)
    return first


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
        model = method_hparams(cfg, self.method_cls)["clip_model"]
        size = backbone.image_size_of(model)
        if tuple(cfg.INPUT.SIZE) != (size, size):
            raise ValueError(f"INPUT.SIZE {tuple(cfg.INPUT.SIZE)} does not match "
                             f"{model}'s image size {size}")

    def build_model(self):
        total_steps = max(1, self.max_epoch * len(self.train_loader_x))
        hparams = method_hparams(self.cfg, self.method_cls, total_steps)
        print(f"Building {self.method_cls.name} with {hparams}")
        classnames, data = self.dm.dataset.classnames, self.dm.dataset
        trained = {item.label for item in data.train_x}
        labels = trained.union(range(self.num_classes),
                               (item.label for item in (data.val or []) + (data.test or [])))
        if labels - trained or len(classnames) != len(labels):
            # Dassl names (and counts) only the classes of the training split
            raise ValueError(f"{self.cfg.DATASET.NAME}: {len(classnames)} class names for "
                             f"{len(labels)} classes: label(s) {sorted(labels - trained)[:10]} "
                             f"have no training image (an empty class)")
        self.model = self.method_cls(prompt_classnames(classnames), hparams, device=self.device)
        self.model.to(self.device)
        if self.method_cls.trains:
            # the method steps its own optimizer and per-step schedule
            self.register_model("model", self.model, self.model.optimizer, None)
        else:
            self.max_epoch = 0  # nothing to train: train() goes straight to the test

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        try:
            summary = self.model.update(images, labels)
        except FloatingPointError:  # a non-finite loss: one line, no checkpoint, no results.json
            step = self.epoch * self.num_batches + self.batch_idx
            raise nonfinite.stopped(self.model, images, labels,
                                    f"epoch {self.epoch + 1}, batch {self.batch_idx + 1} "
                                    f"(step {step})") from None
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


def name_unreadable_files() -> None:
    """Dassl reads images, and CoOp its split files, with dassl.utils' read_image and
    read_json, config files with yacs' merge_from_file, whose errors may not name the
    file (PIL: 'image file is truncated'; json: 'Expecting value: line 1 column 1'; YAML:
    '<unicode string>'): the same reads, with errors that do."""
    import dassl.utils
    from dassl.data import data_manager
    if getattr(data_manager.read_image, "_clipbench", False):
        return
    upstream_image, upstream_json = data_manager.read_image, dassl.utils.read_json

    def read_image(path):
        try:
            return upstream_image(path)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read image {path}: {cli.image_problem(path, e)}") from None

    def read_json(path):
        try:
            return upstream_json(path)
        except ValueError as e:
            raise ValueError(f"{path}: malformed JSON ({e})") from None

    upstream_merge = CN.merge_from_file

    def merge_from_file(self, cfg_filename):
        """yacs' merge, naming the file (PyYAML says '<unicode string>', yacs no file)."""
        import yaml
        try:
            return upstream_merge(self, cfg_filename)
        except yaml.YAMLError as e:
            raise cli.InputError(f"{cfg_filename}: malformed YAML ({cli.yaml_problem(e)})") from None
        except (KeyError, ValueError) as e:  # yacs: 'Non-existent config key: X', 'Type mismatch'
            message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
            raise type(e)(f"{cfg_filename}: {message}") from None

    read_image._clipbench = read_json._clipbench = True
    data_manager.read_image = read_image
    dassl.utils.read_json = dassl.utils.tools.read_json = read_json
    CN.merge_from_file = merge_from_file


class _DatumUnpickler(pickle.Unpickler):
    """Rebuilds lists of Dassl Datum (what CoOp's cache files hold) and nothing else."""
    ALLOWED = {("dassl.data.datasets.base_dataset", "Datum"), ("copyreg", "__newobj__"),
               ("copyreg", "_reconstructor"), ("builtins", "object")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{getattr(self, 'path', 'a CoOp cache file')}: refused: it holds pickled code or "
            f"objects other than Dassl's Datum (GLOBAL {module}.{name}); CoOp's few-shot and "
            f"preprocessed caches are read with an unpickler that never runs it (delete the "
            f"file to have it rebuilt)")


def _load_datums(file):
    unpickler = _DatumUnpickler(file)
    unpickler.path = getattr(file, "name", "a CoOp cache file")
    return unpickler.load()


def refuse_pickled_code_in_coop_caches() -> None:
    """CoOp's datasets read their few-shot splits (split_fewshot/shot_N-seed_S.pkl) and
    ImageNet's preprocessed.pkl with pickle.load, which runs any code such a file carries:
    in each of CoOp's dataset modules `pickle.load` only rebuilds Datum lists. Call after
    CoOp's `datasets` package is first on sys.path (coop_runner.prepare)."""
    import importlib
    import pkgutil
    import types

    import datasets  # CoOp's
    safe = types.SimpleNamespace(load=_load_datums, dump=pickle.dump,
                                 HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL)
    for info in pkgutil.iter_modules(datasets.__path__):
        module = importlib.import_module(f"datasets.{info.name}")
        if getattr(module, "pickle", None) is pickle:
            module.pickle = safe


def register_trainers() -> None:
    for name, method_cls in registry.methods().items():
        if name not in TRAINER_REGISTRY.registered_names():
            trainer = type(name, (CLIPMethodTrainer,), {"method_cls": method_cls,
                                                        "__module__": __name__})
            TRAINER_REGISTRY.register(trainer)
