"""Harness methods as DomainBed algorithms, and their hyperparameters in DomainBed's
registry. The adapter only translates DomainBed's calls; what a method needs to know
about held-out data goes through the one selection protocol (algorithms/core/selection.py)."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from algorithms.core import nonfinite, registry, selection
from domainbed_adapter import data


class _DomainBedAdapter:
    """Mixed into domainbed.algorithms.Algorithm: translates (minibatches, x) calls."""
    method_cls = None

    def __init__(self, input_shape, num_classes, num_domains, hparams):
        super().__init__(input_shape, num_classes, num_domains, hparams)
        classnames = hparams.get("class_names")
        if not classnames:
            raise ValueError(f"{self.method_cls.name}: the dataset gave no class names; "
                             "CLIP methods need an image-folder DomainBed dataset")
        if len(classnames) != num_classes:
            raise ValueError(f"{self.method_cls.name}: {len(classnames)} class names "
                             f"for {num_classes} classes")
        steps = data.job_steps(hparams)
        if self.method_cls.trains and steps and hparams.get("total_steps") != steps:
            # the schedule and moving average follow the job's length
            print(f"{self.method_cls.name}: total_steps {hparams.get('total_steps')} -> {steps} "
                  f"(the job's --steps)")
            hparams["total_steps"] = steps
        self.method = self.method_cls(classnames, hparams)
        hparams["precision"] = self.method.precision  # resolved ("auto" -> bf16 ...): recorded
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
        except FloatingPointError:  # a non-finite loss: one line, no further step, no `done`
            raise nonfinite.stopped(self.method, images, labels,
                                    f"step {self._steps}") from None
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
            held_out = data.held_out_data(self.hparams, which)
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
    hyperparameters, each draw seeded by seed_hash(random_seed, name) as upstream's."""
    from domainbed.lib import misc
    upstream = module._hparams

    def _hparams(algorithm, dataset, random_seed):
        hparams = upstream(algorithm, dataset, random_seed)
        methods = registry.methods()
        if algorithm in methods:
            for name, hp in methods[algorithm].hparams(dataset).items():
                random_state = np.random.RandomState(misc.seed_hash(random_seed, name))
                hparams[name] = (hp.default, hp.sample(random_state))
        return hparams

    module._hparams = _hparams
