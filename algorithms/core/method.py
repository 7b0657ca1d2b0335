"""The method contract: what every method is, and what it declares so that the
DomainBed adapter, the Dassl adapter and the demo need no list of methods.

    cfg = build_config(Method, values)                 # typed, frozen (algorithms/core/config.py)
    context = JobContext.build(cfg, class_names, ...)  # the job's facts (algorithms/core/context.py)
    method = Method(cfg, context)                      # or Method.create(class_names, values, ...)
    method.update(images, labels) -> dict   # one optimisation step; {} if nothing trains
    method.predict(images) -> logits [B, C]
    method.encode_image(images) -> [B, D]   # normalised features it predicts with

Declared on the class (read without building the method):
- `name`: the DomainBed algorithm, Dassl trainer and table name;
- `hparams()`: every hyperparameter, its default and random-search distribution; the
  method reads them as `self.cfg.<name>`. Per-dataset and per-protocol values are not
  here but in the recipe book (recipes/recipes.yaml);
- `trains`: whether `update` takes optimisation steps (False: training-free, one
  evaluation is enough);
- `selects_on`: None, "validation" or "test" -- the held-out data `select()` may see
  (algorithms/core/selection.py); `oracle` is True when that is the test data;
- `reads_training_data`: trains nothing, yet `update` reads the training batches (a
  cache: Tip-Adapter), so the adapters feed it;
- `scores_unseen_classes`: False when it can score only the classes it was fitted on (the
  CoOp protocols then refuse base-to-new and cross-dataset).

The training contract (methods that declare `trains`): a method declares its loss,
`loss(images, labels) -> (loss, {term: value})`, and what trains,
`trainable_parameters()`; it may change `make_optimizer(params)` (default AdamW with
`cfg.lr`, `cfg.weight_decay`) and `after_step()` (e.g. a moving average). The base class
owns the rest: the optimiser and the cosine schedule over `context.total_steps`
(`training_state`, one state_dict for checkpoints), precision and gradient scaling, the
step and the non-finite check (`NonFiniteLoss`, naming the terms that are not finite;
no weight changes on such a step).

`context.domains_per_step`: how many domains a training batch concatenates, in equal
parts (DomainBed: the training domains; Dassl: 1), for methods that treat each apart (DPL).

Open-world protocols (domain + class shift) train on the first `context.train_classes`
classes only: a method's training loss uses `train_class_embeddings`, its predictions
every class.

Frozen sub-modules (named in `frozen_modules`) stay in eval mode whatever `train()` is
asked, and are left out of `state_dict()`: a checkpoint holds only what was trained,
the frozen rest is rebuilt from `clip_model`/`clip_pretrained`.

Precision (hyperparameter `precision`: auto | bf16 | fp16 | fp32, resolved for the
job's device in `context.precision` by algorithms/core/precision.py `choose_precision`):
every image-encoder forward of a training step or an evaluation goes through
`run_encoder`, which runs it under torch.autocast at the method's precision and hands back float32 tensors; everything
after the encoder (heads, losses: margin/CE, semantic label smoothing, attention
alignment; CALIP's scores) runs outside autocast, in fp32. "auto" is bf16 on a CUDA
device with native bf16, fp16 on one without (then the step scales the loss with
torch.amp.GradScaler), fp32 on the CPU. fp32 runs no autocast and no scaler. The text
classifier is computed once, in fp32. `self.precision` holds the resolved name.

Weight averaging (algorithms/core/averaging.py): every training method declares
`averaging` (none | ema | swad | bma) and its settings, added to its `hparams()` here
unless it declares them itself (a default of its own: CLIPood's and AlignCLIP's is bma).
The base class averages what `trainable_parameters()` returns, from the weights the first
step starts from, after every step (SWAD: with the step's loss), and runs `predict`,
`encode_image` and `eval_features` with the averaged values in those parameters
(`averaged_weights()`; the training step always sees the live ones). The averager is the
sub-module named after its kind (`bma.*`, ...), so a checkpoint predicts as the run did.

Cached evaluation features: a method whose evaluation encoder is frozen
(`cache_features`: ZSCLIP, CLIPLP) takes `eval_features(images)` from the shared feature
cache (algorithms/core/feature_cache.py, `$CLIPBENCH_CACHE`), keyed by a content digest
of the batch (see `eval_features_key`); training batches are never cached.
Each method's formulas, defaults and deviations: docs/methods/<name>.md.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from algorithms import backbone
from algorithms.core import averaging, selection
from algorithms.core.config import build_config, config_class, defaults
from algorithms.core.context import JobContext
from algorithms.core.precision import as_fp32, autocast, scales_gradients
from algorithms.core.feature_cache import FeatureCache, batch_digest, tensors_fingerprint
from algorithms.core.hparams import HParams, fixed, precision
from algorithms.core.nonfinite import named_terms
from common.run_facts import file_digest


def clip_hparams() -> HParams:
    return {
        "clip_model": fixed(backbone.DEFAULT_MODEL),
        "clip_pretrained": fixed(backbone.DEFAULT_PRETRAINED),
        "templates": fixed("photo"),
        "precision": precision(),
    }



FEATURES_CACHE_KIND = "image_features"
FEATURES_CACHE_FORMAT = "image-features-v1"


def starting_weights_digest(pretrained: str, clip: nn.Module) -> str:
    """What the run's records name as its starting weights: the sha256 of the weights
    file, else a digest of the loaded CLIP's tensors (a pretrained tag, random weights)."""
    digest = file_digest(backbone.released.weights_file(pretrained)) if pretrained else None
    return digest or f"tensors:{tensors_fingerprint(clip.state_dict().items())}"


class NonFiniteLoss(FloatingPointError):
    """A training step refused because its loss is not finite; `terms` names the loss
    terms that are not finite (else the total, "loss")."""

    def __init__(self, method_name: str, terms: Dict[str, float]):
        self.method_name, self.terms = method_name, dict(terms)
        super().__init__(f"{method_name}: non-finite loss: {named_terms(self.terms)}")


def nonfinite_terms(summary: Dict[str, float], total: float) -> Dict[str, float]:
    """The terms of a step's summary that are not finite; the total when all are."""
    bad = {k: float(v) for k, v in summary.items() if k != "loss" and not math.isfinite(v)}
    return bad or {"loss": float(total)}


class TrainingState:
    """A training method's optimiser, per-step schedule and gradient scaler, saved and
    restored as one state_dict (what a checkpoint holds besides the weights).
    `param_groups` is the optimiser's, read-only, for loggers."""

    def __init__(self, optimizer, scheduler, grad_scaler=None):
        self.optimizer, self.scheduler, self.grad_scaler = optimizer, scheduler, grad_scaler

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" not in state:  # a checkpoint that holds the optimiser's state only
            self.optimizer.load_state_dict(state)
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])


def _with_averaged_weights(fn):
    """`fn` (predict, encode_image, eval_features) run inside `averaged_weights()`."""
    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        with self.averaged_weights():
            return fn(self, *args, **kwargs)
    run._averaged = True
    return run


def _with_averaging_hparams(declare):
    """A training method's `hparams()` plus the averaging ones it does not declare."""
    def hparams() -> HParams:
        declared = dict(declare())
        for name, hp in averaging.averaging_hparams().items():
            declared.setdefault(name, hp)
        return declared
    hparams._averaging = True
    return hparams


AVERAGED_CALLS = ("predict", "encode_image", "eval_features")


class CLIPMethod(nn.Module):
    name = "?"
    trains: bool = False
    selects_on: Optional[str] = None  # None | "validation" | "test"
    frozen_modules: Sequence[str] = ("clip",)
    cache_features: bool = False  # eval_features from the feature cache (frozen encoder)
    reads_training_data: bool = False  # trains nothing, yet update() reads batches (a cache)
    scores_unseen_classes: bool = True  # False: only the classes it was fitted on (base2new: no)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        selection.check_declaration(cls)
        cls.oracle = cls.selects_on == selection.TEST
        if cls.trains and not getattr(cls.hparams, "_averaging", False):
            cls.hparams = staticmethod(_with_averaging_hparams(cls.hparams))
        for name in AVERAGED_CALLS:
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_averaged", False):
                setattr(cls, name, _with_averaged_weights(fn))

    @staticmethod
    def hparams() -> HParams:
        return clip_hparams()

    @classmethod
    def default_hparams(cls) -> dict:
        return defaults(cls)

    @classmethod
    def create(cls, class_names: Sequence[str], values: Optional[dict] = None, *,
               device=None, total_steps: Optional[int] = None,
               train_classes: Optional[int] = None, images_per_step: Optional[int] = None):
        """Build the method from hyperparameter values (checked, the rest declared
        defaults) and the job's facts: what code outside the adapters calls."""
        cfg = build_config(cls, values)
        return cls(cfg, JobContext.build(cfg, class_names, train_classes=train_classes,
                                         total_steps=total_steps,
                                         images_per_step=images_per_step, device=device,
                                         where=cls.name))

    def __init__(self, cfg, context: JobContext):
        super().__init__()
        if not isinstance(cfg, config_class(type(self))):
            raise TypeError(f"{self.name}: expected a {config_class(type(self)).__name__} "
                            f"(algorithms/core/config.py build_config), got {type(cfg).__name__}")
        self.cfg, self.context = cfg, context
        self.classnames = list(context.class_names)
        self.train_classes = context.train_classes
        self.precision = context.precision
        device = context.device
        self._grad_scaler: Optional[torch.amp.GradScaler] = None
        self._training: Optional[TrainingState] = None
        self._features_fingerprint = (None, None)  # (parameter versions, digest)
        self.averaging = self.averaging_kind() if self.trains else "none"
        self._live_weights = True  # False in a training step, or while swapped out
        self.clip, self.tokenizer = backbone.load_clip(cfg.clip_model, cfg.clip_pretrained,
                                                       device=device)
        self.clip.requires_grad_(False)
        self.weights_digest = starting_weights_digest(cfg.clip_pretrained, self.clip)
        self.register_buffer("class_embeddings", backbone.text_classifier(
            self.clip, self.tokenizer, self.classnames, cfg.templates, device),
            persistent=False)
        self._register_state_dict_hook(_drop_frozen_keys)
        self._register_load_state_dict_pre_hook(_keep_frozen_weights, with_module=True)
        self._register_load_state_dict_pre_hook(_averager_for_checkpoint, with_module=True)

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

    # -- precision: the one place autocast and gradient scaling happen ------------------

    def autocast(self):
        return autocast(self.precision, self.class_embeddings.device.type)

    def fp32(self):
        """Autocast off (losses, heads), also inside a caller's autocast."""
        return autocast("fp32", self.class_embeddings.device.type)

    def run_encoder(self, encoder, *args, **kwargs):
        """`encoder(*args, **kwargs)` (an image-encoder forward) under the method's
        precision; its half-precision outputs come back as float32, so that what follows
        (heads, losses) runs in fp32."""
        with self.autocast():
            out = encoder(*args, **kwargs)
        return as_fp32(out)

    @property
    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """torch.amp.GradScaler when the precision needs one (fp16), else None."""
        if not scales_gradients(self.precision):
            return None
        if self._grad_scaler is None:
            self._grad_scaler = torch.amp.GradScaler(self.class_embeddings.device.type)
        return self._grad_scaler

    @_with_averaged_weights
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.run_encoder(self.clip.encode_image, images), dim=-1)

    @_with_averaged_weights
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.eval_features(images) @ self.class_embeddings.T

    # -- weight averaging (algorithms/core/averaging.py) ---------------------------------

    def averaging_kind(self) -> str:
        """The averaging this run uses (`cfg.averaging`, checked)."""
        return averaging.check_kind(self.cfg.averaging, self.name)

    def averaged_parameters(self) -> List[nn.Parameter]:
        """`trainable_parameters()`, each once, in order: what the average covers."""
        seen, params = set(), []
        for param in self.trainable_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
        return params

    @property
    def averager(self) -> Optional[averaging.Averager]:
        """The averager (made on first use from the current weights), None without one."""
        if self.averaging == "none":
            return None
        if self.averaging not in self._modules:
            self.add_module(self.averaging, averaging.make_averager(
                self.averaging, self.cfg, self.averaged_parameters(), self.context.total_steps))
        return self._modules[self.averaging]

    @contextlib.contextmanager
    def averaged_weights(self):
        """Inside: the averaged values in the averaged parameters (swapped, not copied);
        the live weights when there is no average yet, or already swapped."""
        averager = self._modules.get(self.averaging) if self.averaging != "none" else None
        if averager is None or not averager.ready or not self._live_weights:
            yield
            return
        pairs = list(zip(self.averaged_parameters(), averager.average))
        self._live_weights = False
        for param, average in pairs:
            param.data, average.data = average.data, param.data
        try:
            yield
        finally:
            for param, average in pairs:
                param.data, average.data = average.data, param.data
            self._live_weights = True

    # -- the training contract -----------------------------------------------------------

    def loss(self, images: torch.Tensor, labels: torch.Tensor):
        """(loss, {term: value}) of one training batch (training methods)."""
        raise NotImplementedError(f"{self.name} declares `trains` but no loss")

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """What the optimiser steps (training methods)."""
        raise NotImplementedError(f"{self.name} declares `trains` but no trainable parameters")

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def after_step(self) -> Dict[str, float]:
        """Called after every optimisation step; what it returns joins the step's summary."""
        return {}

    @property
    def training_state(self) -> TrainingState:
        """The optimiser over `trainable_parameters()` and its cosine schedule over the
        job's steps (made on first use), with the gradient scaler when fp16 needs one."""
        if self._training is None:
            optimizer = self.make_optimizer(list(self.trainable_parameters()))
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, int(self.context.total_steps)))
            self._training = TrainingState(optimizer, scheduler, self.grad_scaler)
        return self._training

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        """One training step: the loss (the encoder at the method's precision, the rest
        in fp32), then `step`; {} for a training-free method."""
        if not self.trains:
            return {}
        averager = self.averager  # made before the first step: it starts from theta_0
        self._live_weights = False  # the step sees the live weights, never the average
        try:
            with self.fp32():  # the encoder runs at self.precision inside (run_encoder)
                loss, summary = self.loss(images, labels)
            summary = dict(summary)
            summary["loss"] = self.step(loss, summary)
        finally:
            self._live_weights = True
        if averager is not None:
            summary.update(averager.update(self.averaged_parameters(), summary["loss"]))
        summary.update(self.after_step())
        return summary

    def step(self, loss: torch.Tensor, summary: Optional[Dict[str, float]] = None) -> float:
        """One optimisation step of the method's optimiser and per-step schedule (the loss
        scaled for fp16). A non-finite loss raises NonFiniteLoss before any weight
        changes, naming the terms of `summary` that are not finite."""
        total = loss.item()
        if not math.isfinite(total):
            raise NonFiniteLoss(self.name, nonfinite_terms(summary or {}, total))
        state = self.training_state
        state.optimizer.zero_grad(set_to_none=True)
        scaler = state.grad_scaler
        if scaler is None:
            loss.backward()
            state.optimizer.step()
        else:  # skips the update when the scaled gradients overflowed, then lowers the scale
            scaler.scale(loss).backward()
            scaler.step(state.optimizer)
            scaler.update()
        state.scheduler.step()
        return total

    # -- cached evaluation features ------------------------------------------------------

    @_with_averaged_weights
    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """`encode_image(images)` of an evaluation batch; for a method with a frozen
        evaluation encoder (`cache_features`) read from the shared feature cache when it
        is on and holds the batch, else computed and stored there."""
        cache = FeatureCache.from_env(FEATURES_CACHE_KIND) if self.cache_features else None
        if cache is None:
            return self.encode_image(images)
        entry = cache.get_or_compute(
            self.eval_features_key(images),
            lambda: {"features": self.encode_image(images).detach().cpu()}, verbose=False)
        return entry["features"].to(images.device)

    def eval_features_key(self, images: torch.Tensor) -> dict:
        """The cache key of a batch's features: a content digest of the batch (its exact
        pixel values, i.e. dataset, split, images and transform at once, and never stale:
        a randomly augmented batch simply misses), the encoder (model name and a digest of
        the image tower's weights), the precision and device type (their rounding), and
        which encode_image computes them (ZSCLIP and CLIPLP share entries). `data` names
        the entry's file (FeatureCache.path: `<dataset>_<split>_<digest>.pt`): an
        evaluation batch has no dataset or split of its own, so its `split` slot holds the
        precision, a label of the file name only (the key's `precision` field is what
        tells entries apart; the slot stays, since changing it would rename every entry)."""
        encoder = type(self).encode_image
        return {"format": FEATURES_CACHE_FORMAT, "clip_model": self.cfg.clip_model,
                "weights": self.encoder_fingerprint(), "precision": self.precision,
                "device": images.device.type,
                "encode_image": f"{encoder.__module__}.{encoder.__qualname__}",
                # file-name label only: "split" holds the precision (see the docstring)
                "data": {"dataset": "batch", "split": self.precision,
                         "images": batch_digest(images)}}

    def encoder_fingerprint(self) -> str:
        """Digest of the image tower's weights, recomputed only when a parameter or
        buffer changed (in-place version counters, storage) since the last one."""
        state = self.clip.visual.state_dict()
        versions = tuple((t.data_ptr(), t._version) for t in state.values())
        if self._features_fingerprint[0] != versions:
            self._features_fingerprint = (versions, tensors_fingerprint(state.items()))
        return self._features_fingerprint[1]

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


def _averager_for_checkpoint(module, state_dict, prefix, *args):
    """A checkpoint that holds an average: make the averager first, so that it loads."""
    if module.averaging != "none" and any(
            k.startswith(f"{prefix}{module.averaging}.") for k in state_dict):
        module.averager  # noqa: B018 (made on first use)
