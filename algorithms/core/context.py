"""What the harness knows about a job that is not a hyperparameter, gathered once per job
by the adapter that runs it (DomainBed, Dassl, a test) and handed to the method beside
its config; nothing writes it back into the hyperparameters.

    context = JobContext.build(cfg, class_names, train_classes=..., total_steps=...,
                               images_per_step=..., device="cuda")
    method = CLIPood(cfg, context)

- class_names: every class the method predicts, in label order;
- train_classes: the first `train_classes` classes are those training may see (open-world
  protocols train on the base classes only); None = all;
- total_steps: the job's optimisation steps (the cosine schedule and the moving average
  span them): DomainBed's --steps (else the dataset's N_STEPS), Dassl's epochs x batches;
- images_per_step: images in one training step, all domains together (DomainBed:
  batch_size x training domains; Dassl: DATALOADER.TRAIN_X.BATCH_SIZE); None when unknown;
- domains_per_step: how many equal parts, one per domain, a training batch is made of
  (DomainBed: the training domains, concatenated in order; Dassl: 1);
- device, precision: where the method runs and the precision `cfg.precision` resolves to
  there (algorithms/core/precision.py `choose_precision`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from algorithms.core.precision import choose_precision


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class JobContext:
    class_names: Tuple[str, ...]
    device: str
    precision: str
    train_classes: int
    total_steps: int = 1
    images_per_step: Optional[int] = None
    domains_per_step: int = 1

    @classmethod
    def build(cls, cfg, class_names: Sequence[str], *, train_classes: Optional[int] = None,
              total_steps: Optional[int] = None, images_per_step: Optional[int] = None,
              device=None, where: str = "job",
              domains_per_step: Optional[int] = None) -> "JobContext":
        class_names = tuple(str(c) for c in class_names)
        if not class_names:
            raise ValueError(f"{where}: no class names")
        train_classes = int(train_classes or len(class_names))
        if not 0 < train_classes <= len(class_names):
            raise ValueError(f"{where}: train_classes={train_classes} for "
                             f"{len(class_names)} classes")
        device = str(device or default_device())
        return cls(class_names=class_names, device=device,
                   precision=choose_precision(getattr(cfg, "precision", None), device),
                   train_classes=train_classes, total_steps=max(1, int(total_steps or 1)),
                   images_per_step=images_per_step,
                   domains_per_step=max(1, int(domains_per_step or 1)))
