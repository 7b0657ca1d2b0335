"""Tip-Adapter and Tip-Adapter-F (Zhang et al., "Tip-Adapter: Training-free Adaption of
CLIP for Few-shot Classification", ECCV 2022). Documentation: docs/methods/tip_adapter.md.

A cache model of training features: keys F [K, D] (normalised image features of up to
`cache_shots` training images per class), values L [K, C] (their one-hot labels). For a
normalised test feature f and the text classifier T [C, D]:

    A      = exp(-beta (1 - f F^T))                      [K] affinities
    logits = logit_scale f T^T + alpha A L

`TipAdapter` is training-free; `TipAdapterF` also fine-tunes the keys (AdamW, lr 1e-3,
eps 1e-4, cross-entropy of the logits above at the initial alpha, beta). Both select
(alpha, beta) on validation data only (algorithms/core/selection.py): the reference's grid,
beta_i = 0.1 + i (beta_max - 0.1) / beta_steps, alpha_j likewise, the first best top-1 in
(beta, alpha) row-major order wins.

The cache is built from the training batches `update` sees (in both harnesses, DomainBed's
training domains, Dassl's few-shot train_x): each batch's images join it while their class
has a free slot, one view per image. Slot k belongs to class k // cache_shots; an empty
slot adds nothing. `TipAdapter` declares `reads_training_data`: it trains nothing, yet the
Dassl adapter passes over the training set for it. The validation features are kept after
`select`, so that the search runs again whenever the cache changed since (DomainBed selects
once, before the cache is full; TipAdapterF's keys move every step).

From the reference (gaopengcuhk/Tip-Adapter main.py, utils.py @ d0e2d6f): the formula, the
grid, AdamW(lr, eps=1e-4) with cosine over the steps, alpha/beta fixed at init_alpha,
init_beta while the keys train. Not taken: each key is the mean of 10 augmented views
(`augment_epoch`; a method here sees batches, not image identities); CLIP's fixed 100 is
`logit_scale` (100 for OpenAI weights); the reference keeps the epoch with the best test
accuracy (here: the last keys, nothing chosen on test data).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from algorithms.core import selection
from algorithms.core.hparams import HParams, choice, fixed, log_uniform
from algorithms.core.method import CLIPMethod, clip_hparams
from algorithms.core.registry import register_method


# --- formulas -------------------------------------------------------------------------

def affinity(similarity: torch.Tensor, beta: float) -> torch.Tensor:
    """A = exp(-beta (1 - f F^T)), from the similarities f F^T [B, K]."""
    return torch.exp(-beta * (1.0 - similarity))


def cache_logits(similarity, filled, beta: float, shots: int) -> torch.Tensor:
    """A L for the slot layout (slot k holds class k // shots; empty slots add 0): [B, C]."""
    weights = affinity(similarity, beta) * filled.to(similarity.dtype)
    return weights.reshape(len(similarity), -1, shots).sum(dim=2)


def tip_logits(clip_logits, cache, alpha: float) -> torch.Tensor:
    """logits = CLIP's logits + alpha * A L."""
    return clip_logits + alpha * cache


def reference_grid(high: float, steps: int, low: float = 0.1) -> torch.Tensor:
    """The reference's search_hp list: low + i (high - low) / steps, i = 0..steps-1."""
    return torch.tensor([i * (high - low) / steps + low for i in range(int(steps))],
                        dtype=torch.float64)


def search_alpha_beta(clip_logits, features, keys, filled, labels, shots: int,
                      alphas: torch.Tensor, betas: torch.Tensor):
    """(alpha, beta, accuracy): the first best top-1 over betas (outer) x alphas (inner)."""
    correct = torch.zeros(len(betas), len(alphas), dtype=torch.long)
    scale = alphas.to(clip_logits.dtype)[None, :, None]
    similarity = features @ keys.T
    for i, beta in enumerate(betas.tolist()):
        cache = cache_logits(similarity, filled, beta, shots)
        predicted = (clip_logits[:, None] + scale * cache[:, None]).argmax(dim=2)  # [N, A]
        correct[i] = (predicted == labels[:, None]).sum(dim=0).cpu()
    best = int(torch.argmax(correct.flatten()))  # the first maximum, as `acc > best_acc`
    i, j = divmod(best, len(alphas))
    return float(alphas[j]), float(betas[i]), float(correct[i, j]) / max(1, len(labels))


# --- methods ----------------------------------------------------------------------------

def tip_hparams() -> HParams:
    """Defaults: the reference's ImageNet config (configs/imagenet.yaml); the per-dataset
    ones are the recipe book's."""
    hparams = dict(clip_hparams())
    hparams.update({
        "cache_shots": fixed(16),       # cache slots per class
        "init_alpha": fixed(1.17),      # used before any search (and while -F trains)
        "init_beta": fixed(1.0),
        "alpha_max": choice(3.0, (1.0, 3.0, 5.0, 10.0)),   # search_scale[1]
        "beta_max": choice(7.0, (7.0, 10.0, 12.0, 20.0)),  # search_scale[0]
        "alpha_steps": fixed(20),       # search_step[1]
        "beta_steps": fixed(200),       # search_step[0]
    })
    return hparams


@register_method
class TipAdapter(CLIPMethod):
    """Training-free: the cache of training features, alpha and beta searched on
    validation data (see the module docstring)."""
    name = "TipAdapter"
    selects_on = selection.VALIDATION
    cache_features = True  # frozen encoder: evaluation features shared with ZSCLIP
    reads_training_data = True  # update() fills the cache: the adapters feed it batches
    scores_unseen_classes = False  # the cache holds the training classes only

    @staticmethod
    def hparams() -> HParams:
        return tip_hparams()

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        if cfg.cache_shots < 1:
            raise ValueError(f"{self.name}: cache_shots must be at least 1, got {cfg.cache_shots}")
        device = self.class_embeddings.device
        slots = len(self.classnames) * int(cfg.cache_shots)
        self.make_keys(torch.zeros(slots, self.class_embeddings.shape[1], device=device))
        self.register_buffer("filled", torch.zeros(slots, dtype=torch.bool, device=device))
        self.register_buffer("alpha_beta", torch.tensor(
            [float(cfg.init_alpha), float(cfg.init_beta)], dtype=torch.float64, device=device))
        self.selected: Optional[Dict[str, float]] = None
        self._held_out = None  # (features, labels) of the validation data, after select
        self._cache_version = 0
        self._searched_version = -1

    def make_keys(self, keys: torch.Tensor) -> None:
        self.register_buffer("keys", keys)

    @property
    def shots(self) -> int:
        return int(self.cfg.cache_shots)

    # -- the cache -----------------------------------------------------------------------

    @torch.no_grad()
    def add_to_cache(self, features: torch.Tensor, labels: torch.Tensor) -> int:
        """Put normalised features into the free slots of their classes, in batch order;
        returns how many joined."""
        per_class = self.filled.view(-1, self.shots)
        added = 0
        for label in labels.unique().tolist():
            free = torch.nonzero(~per_class[label]).flatten()
            rows = features[labels == label][:len(free)]
            if len(rows):
                slots = label * self.shots + free[:len(rows)]
                self.keys[slots] = rows.to(self.keys.dtype)
                self.filled[slots] = True
                added += len(rows)
        if added:
            self._cache_version += 1
        return added

    def update(self, images, labels):
        if not bool(self.filled.all()):
            with torch.no_grad():
                self.add_to_cache(self.encode_image(images), labels)
        return self.summary()

    def summary(self) -> Dict[str, float]:
        alpha, beta = self.alpha_beta.tolist()
        return {"cache_size": float(self.filled.sum()), "alpha": alpha, "beta": beta}

    # -- prediction ----------------------------------------------------------------------

    def logits(self, features: torch.Tensor, alpha: float, beta: float,
               classes: Optional[int] = None) -> torch.Tensor:
        classes = classes or len(self.classnames)
        rows = classes * self.shots
        zero_shot = self.logit_scale * features @ self.class_embeddings[:classes].T
        cache = cache_logits(features @ self.keys[:rows].T, self.filled[:rows], beta, self.shots)
        return tip_logits(zero_shot, cache, alpha)

    def predict(self, images):
        if self._held_out is not None and self._searched_version != self._cache_version:
            self.search()
        alpha, beta = self.alpha_beta.tolist()
        return self.logits(self.eval_features(images), alpha, beta)

    # -- selection -----------------------------------------------------------------------

    @torch.no_grad()
    def select(self, batches, data_key: Optional[dict] = None) -> Dict[str, float]:
        """Keep the validation features (from the shared feature cache when it holds
        them) and search alpha, beta on them; `data_key` is not needed."""
        features, labels = [], []
        device = self.class_embeddings.device
        for images, batch_labels in batches:
            features.append(self.eval_features(images.to(device)))
            labels.append(torch.as_tensor(batch_labels).long().to(device))
        if not labels:
            raise ValueError(f"{self.name}: the held-out data is empty")
        self._held_out = (torch.cat(features), torch.cat(labels))
        return self.search()

    @torch.no_grad()
    def search(self) -> Dict[str, float]:
        """alpha, beta on the kept validation features with the cache as it is now."""
        features, labels = self._held_out
        cfg = self.cfg
        with self.averaged_weights():
            alpha, beta, accuracy = search_alpha_beta(
                self.logit_scale * features @ self.class_embeddings.T, features, self.keys,
                self.filled, labels, self.shots, reference_grid(cfg.alpha_max, cfg.alpha_steps),
                reference_grid(cfg.beta_max, cfg.beta_steps))
        self.alpha_beta.copy_(torch.tensor([alpha, beta], dtype=torch.float64))
        self._searched_version = self._cache_version
        self.selected = {"alpha": alpha, "beta": beta, "select_acc": accuracy,
                         "select_images": float(len(labels)),
                         "cache_size": float(self.filled.sum())}
        print(f"{self.name}: selected alpha={alpha:.3f} beta={beta:.3f} on the "
              f"{self.selects_on} data ({len(labels)} images, cache of "
              f"{int(self.filled.sum())}, accuracy {100 * accuracy:.2f}%)")
        return dict(self.selected)


@register_method
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys are a parameter, fine-tuned with cross-entropy."""
    name = "TipAdapterF"
    trains = True

    @staticmethod
    def hparams() -> HParams:
        hparams = tip_hparams()
        hparams.update({
            "lr": log_uniform(1e-3, -4.0, -2.0),
            "weight_decay": fixed(0.01),   # torch.optim.AdamW's default, as the reference
            "adam_eps": fixed(1e-4),
        })
        return hparams

    def make_keys(self, keys: torch.Tensor) -> None:
        self.keys = torch.nn.Parameter(keys)

    def trainable_parameters(self):
        return [self.keys]

    def make_optimizer(self, params):
        return torch.optim.AdamW(params, lr=self.cfg.lr, eps=self.cfg.adam_eps,
                                 weight_decay=self.cfg.weight_decay)

    def update(self, images, labels):
        summary = CLIPMethod.update(self, images, labels)
        self._cache_version += 1  # the keys moved
        return {**summary, **self.summary()}

    def loss(self, images, labels):
        """The batch joins the cache first (where its classes have free slots), then the
        cross-entropy of the Tip-Adapter logits at init_alpha, init_beta."""
        with torch.no_grad():
            features = self.encode_image(images)  # training batches: never cached
        self.add_to_cache(features, labels)
        logits = self.logits(features, float(self.cfg.init_alpha), float(self.cfg.init_beta),
                             self.train_classes)
        return F.cross_entropy(logits, labels), {}
