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

Precision (hyperparameter `precision`: auto | bf16 | fp16 | fp32; `choose_precision`):
every image-encoder forward of a training step or an evaluation goes through
`run_encoder`, which runs it under torch.autocast at the method's precision and hands
back float32 tensors; everything after the encoder (heads, losses: margin/CE, semantic
label smoothing, attention alignment; CALIP's scores) runs outside autocast, in fp32.
"auto" is bf16 on a CUDA device with native bf16, fp16 on one without (then `step`
scales the loss with torch.amp.GradScaler), fp32 on the CPU. fp32 runs no autocast and
no scaler: the numbers are those of the harness before precision existed. The text
classifier is computed once, in fp32. `self.precision` holds the resolved name; the
adapters record it.

Cached evaluation features: a method whose evaluation encoder is frozen
(`cache_features`: ZSCLIP, CLIPLP) takes `eval_features(images)` from the shared feature
cache (algorithms/core/feature_cache.py, `$CLIPBENCH_CACHE`), keyed by a content digest
of the batch (see `eval_features_key`); training batches are never cached.
Each method's formulas, defaults and deviations: docs/methods/<name>.md.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from algorithms import backbone
from algorithms.core import selection
from algorithms.core.feature_cache import FeatureCache, batch_digest, tensors_fingerprint
from algorithms.core.hparams import PRECISIONS, HParams, fixed, precision


def clip_hparams() -> HParams:
    return {
        "clip_model": fixed(backbone.DEFAULT_MODEL),
        "clip_pretrained": fixed(backbone.DEFAULT_PRETRAINED),
        "templates": fixed("photo"),
        "precision": precision(),
    }


# hyperparameters declared after records were first saved: absent = this default
LATER_HPARAMS = {"precision": "auto"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- precision ------------------------------------------------------------------------

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(requested: Optional[str], device) -> str:
    """The precision a method runs at on `device`: bf16 | fp16 | fp32.
    "auto" (or None): bf16 on a CUDA device with native bf16 (Ampere and later), fp16 on
    a CUDA device without it (with gradient scaling, see `scales_gradients`), fp32 on
    any other device. An explicit bf16 on a CUDA device without native bf16 is an error."""
    requested = str(requested or "auto").lower()
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} not in {PRECISIONS}")
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32" if requested == "auto" else requested
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if requested == "auto":
        return "bf16" if native_bf16 else "fp16"
    if requested == "bf16" and not native_bf16:
        raise ValueError("precision bf16: this CUDA device has no native bf16; "
                         "use fp16 or auto")
    return requested


def scales_gradients(precision_name: str) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
    return precision_name == "fp16"


def autocast(precision_name: str, device_type: str):
    """torch.autocast at `precision_name`; fp32: autocast off (also inside an outer one)."""
    if precision_name == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision_name])


def as_fp32(value):
    """bf16/fp16 tensors in `value` (a tensor, tuple, list, dict or dataclass of them) as
    float32; float32 tensors are returned as they are (no copy)."""
    if torch.is_tensor(value):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(as_fp32(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(as_fp32(v) for v in value)
    if isinstance(value, dict):
        return {k: as_fp32(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: as_fp32(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


FEATURES_CACHE_KIND = "image_features"
FEATURES_CACHE_FORMAT = "image-features-v1"


class CLIPMethod(nn.Module):
    name = "?"
    trains: bool = False
    selects_on: Optional[str] = None  # None | "validation" | "test"
    tiny_hparams: Dict[str, object] = {}
    frozen_modules: Sequence[str] = ("clip",)
    cache_features: bool = False  # eval_features from the feature cache (frozen encoder)

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
        hparams = {**LATER_HPARAMS, **hparams}
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
        self.precision = choose_precision(hparams.get("precision"), device)
        self._grad_scaler: Optional[torch.amp.GradScaler] = None
        self._features_fingerprint = (None, None)  # (parameter versions, digest)
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

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.run_encoder(self.clip.encode_image, images), dim=-1)

    def update(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.eval_features(images) @ self.class_embeddings.T

    def step(self, loss: torch.Tensor) -> float:
        """One optimisation step of the method's own optimizer and per-step schedule
        (the loss scaled for fp16); a non-finite loss is an error that names the method
        and the step."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: non-finite loss {loss.item()} at step "
                                     f"{self.scheduler.last_epoch}")
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.grad_scaler
        if scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # skips the update when the scaled gradients overflowed, then lowers the scale
            scaler.scale(loss).backward()
            scaler.step(self.optimizer)
            scaler.update()
        self.scheduler.step()
        return loss.item()

    # -- cached evaluation features ------------------------------------------------------

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
        which encode_image computes them (ZSCLIP and CLIPLP share entries)."""
        encoder = type(self).encode_image
        return {"format": FEATURES_CACHE_FORMAT, "clip_model": self.hp["clip_model"],
                "weights": self.encoder_fingerprint(), "precision": self.precision,
                "device": images.device.type,
                "encode_image": f"{encoder.__module__}.{encoder.__qualname__}",
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
