"""The method contract: what every method is, and what it declares so that the
DomainBed adapter, the Dassl adapter and the demo need no list of methods.

    method = Method(classnames, hparams)    # hparams: plain dict, keys as declared
    method.update(images, labels) -> dict   # one optimisation step; {} if nothing trains
    method.predict(images) -> logits [B, C]
    method.encode_image(images) -> [B, D]   # normalised features it predicts with

Declared on the class (read without building the method):
- `name`: the DomainBed algorithm, Dassl trainer and table name;
- `hparams(dataset)`: every hyperparameter, its default and random-search distribution;
- `trains`: whether `update` takes optimisation steps (False: training-free, one
  evaluation is enough);
- `selects_on`: None, "validation" or "test" -- the held-out data `select()` may see
  (algorithms/core/selection.py); `oracle` is True when that is the test data;
- `tiny_hparams`: what the embedded default changes for its tiny CLIP (a few dozen
  steps on 64 px images), on top of the declared defaults.

Open-world protocols (domain + class shift) train on the first `train_classes` classes
only (hparams["train_classes"], set by the dataset; default all): a method's training
loss uses `train_class_embeddings`, its predictions every class.

Frozen sub-modules (named in `frozen_modules`) stay in eval mode whatever `train()` is
asked, and are left out of `state_dict()`: a checkpoint holds only what was trained,
the frozen rest is rebuilt from `clip_model`/`clip_pretrained`.
Each method's formulas, defaults and deviations: docs/methods/<name>.md.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from algorithms import backbone
from algorithms.core import selection
from algorithms.core.hparams import HParams, fixed


def clip_hparams() -> HParams:
    return {
        "clip_model": fixed(backbone.DEFAULT_MODEL),
        "clip_pretrained": fixed(backbone.DEFAULT_PRETRAINED),
        "templates": fixed("photo"),
    }


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class CLIPMethod(nn.Module):
    name = "?"
    trains: bool = False
    selects_on: Optional[str] = None  # None | "validation" | "test"
    tiny_hparams: Dict[str, object] = {}
    frozen_modules: Sequence[str] = ("clip",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        selection.check_declaration(cls)
        cls.oracle = cls.selects_on == selection.TEST

    @staticmethod
    def hparams(dataset: str | None = None) -> HParams:
        return clip_hparams()

    @classmethod
    def default_hparams(cls, dataset: str | None = None) -> dict:
        return {k: h.default for k, h in cls.hparams(dataset).items()}

    def __init__(self, classnames: Sequence[str], hparams: dict, device=None):
        super().__init__()
        missing = sorted(set(self.hparams()) - set(hparams))
        if missing:
            raise KeyError(f"{self.name}: missing hyperparameters {missing}")
        self.classnames = list(classnames)
        self.hp = dict(hparams)
        self.train_classes = int(hparams.get("train_classes") or len(self.classnames))
        if not 0 < self.train_classes <= len(self.classnames):
            raise ValueError(f"{self.name}: train_classes={self.train_classes} for "
                             f"{len(self.classnames)} classes")
        device = device or default_device()
        self.clip, self.tokenizer = backbone.load_clip(
            hparams["clip_model"], hparams["clip_pretrained"], device=device)
        self.clip.requires_grad_(False)
        self.register_buffer("class_embeddings", backbone.text_classifier(
            self.clip, self.tokenizer, self.classnames, hparams["templates"], device),
            persistent=False)
        self._register_state_dict_hook(_drop_frozen_keys)
        self._register_load_state_dict_pre_hook(_keep_frozen_weights, with_module=True)

    @property
    def train_class_embeddings(self) -> torch.Tensor:
        """The text classifier of the classes training may see (all but open classes)."""
        return self.class_embeddings[:self.train_classes]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.clip.encode_image(images), dim=-1)

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.encode_image(images) @ self.class_embeddings.T

    def step(self, loss: torch.Tensor) -> float:
        """One optimisation step of the method's own optimizer and per-step schedule;
        a non-finite loss is an error that names the method and the step."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: non-finite loss {loss.item()} at step "
                                     f"{self.scheduler.last_epoch}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def has_trainable_parameters(self) -> bool:
        return any(p.requires_grad for p in self.parameters())


def _frozen_prefixes(module: CLIPMethod, prefix: str):
    return tuple(f"{prefix}{name}." for name in module.frozen_modules)


def _drop_frozen_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(_frozen_prefixes(module, prefix))]:
        del state_dict[key]


def _keep_frozen_weights(module, state_dict, prefix, *args):
    """Checkpoints lack the frozen weights: load the ones the module already has."""
    for name in module.frozen_modules:
        for key, value in getattr(module, name).state_dict(keep_vars=True).items():
            state_dict.setdefault(f"{prefix}{name}.{key}", value)
