"""Harness methods as DomainBed algorithms, and their hyperparameters in DomainBed's
registry. The adapter only translates DomainBed's calls: it builds the method's config
from the job's hyperparameters (algorithms/core/config.py), its JobContext from the job
(domainbed_adapter/job.py), and what a method needs to know about held-out data goes
through the one selection protocol (algorithms/core/selection.py)."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from algorithms.core import nonfinite, registry, selection
from algorithms.core.config import build_config
from algorithms.core.method import NonFiniteLoss
from domainbed_adapter import data, job


class _DomainBedAdapter:
    """Mixed into domainbed.algorithms.Algorithm: translates (minibatches, x) calls."""
    method_cls = None

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        name = self.method_cls.name
        declared = self.method_cls.hparams()
        cfg = build_config(self.method_cls, {k: hparams[k] for k in declared if k in hparams},
                           f"{name}'s hyperparameters")
        context = job.context(self.method_cls, cfg, hparams, num_domains)
        if len(context.class_names) != num_classes:
            raise ValueError(f"{name}: {len(context.class_names)} class names "
                             f"for {num_classes} classes")
        reference = job.reference_steps(self.method_cls, hparams)
        if self.method_cls.trains and reference and reference != context.total_steps:
            print(f"{name}: the schedule spans the job's {context.total_steps} steps "
                  f"(the reference trains {reference}: recipes/recipes.yaml)")
        self.method = self.method_cls(cfg, context)
        job.record(hparams, self.method, context, self.method.weights_digest)
        self._selected = False
        self._steps = 0  # DomainBed's step of the next update (train.py starts at 0)

    def update(self, minibatches, unlabeled=None):
        images = torch.cat([x for x, _ in minibatches])
        labels = torch.cat([y for _, y in minibatches])
        selected = {}
        if not self._selected and not self.method_cls.trains:
            # training-free: select before the first step, so DomainBed's record holds it
            selected = self._select(images.device)
        try:
            summary = self.method.update(images, labels)
        except NonFiniteLoss as e:  # one line, no further step, no `done`
            raise nonfinite.stopped(e, f"step {self._steps}") from None
        self._steps += 1
        return {**selected, **summary}

    def predict(self, x):
        if not self._selected:
            self._select(x.device)
        return self.method.predict(x)

    def _select(self, device) -> dict:
        """Once: select on the held-out data the method declared. Before the first
        update for a training-free method, else before the first predict."""
        self._selected = True

        def provide(which):
            held_out = data.held_out_data(job.for_hparams(self.hparams), which)
            if held_out is None:
                return None
            loader, key = held_out
            batches = ((x.to(device), y.to(device)) for x, y in loader)
            return batches, key, key["split"]

        summary = selection.run(self.method, provide, warn=warnings.warn)
        summary.pop("split", None)  # DomainBed's records hold numbers per step
        return summary


def register_algorithms(module):
    for name, method_cls in registry.methods().items():
        adapter = type(name, (_DomainBedAdapter, module.Algorithm),
                       {"method_cls": method_cls, "__module__": module.__name__})
        setattr(module, name, adapter)
        if name not in module.ALGORITHMS:
            module.ALGORITHMS.append(name)


def declare_hparams(module):
    """Wrap hparams_registry._hparams: a harness algorithm gets its declared
    hyperparameters, each draw seeded by seed_hash(random_seed, name) as upstream's, with
    the recipe book's values for the dataset (recipes/recipes.yaml) as defaults; a value
    the method does not search (a fixed declaration) is the recipe's in every draw too.
    DomainBed's own `batch_size` (images per source domain) comes from the book."""
    from domainbed.lib import misc

    from algorithms.core.hparams import choice
    from recipes import recipe
    upstream = module._hparams

    def _hparams(algorithm, dataset, random_seed):
        hparams = upstream(algorithm, dataset, random_seed)
        methods = registry.methods()
        if algorithm not in methods:
            return hparams
        declared = methods[algorithm].hparams()
        book = recipe(algorithm, "domainbed", dataset)
        for name, hp in declared.items():
            draw = hp.sample(np.random.RandomState(misc.seed_hash(random_seed, name)))
            if name in book:
                default = book[name].value
                hparams[name] = (default, default if hp.fixed else draw)
            else:
                hparams[name] = (hp.default, draw)
        if "batch_size" in book:
            value = book["batch_size"]
            sampler = choice(value.value, value.search or (value.value,))
            hparams["batch_size"] = (value.value, sampler.sample(
                np.random.RandomState(misc.seed_hash(random_seed, "batch_size"))))
        return hparams

    module._hparams = _hparams
