"""The DomainBed job this process runs, gathered once, in one place: what the harness
knows about it that is not a hyperparameter (the method's JobContext), and the facts its
records carry.

DomainBed's train.py parses its arguments (`args`, a global of the `__main__` module:
read, never re-parsed), builds the dataset (the patched image folder calls
`dataset_built`), then builds the algorithm with the hyperparameter dict only. The job
remembers the dataset and the dict it was built with; the algorithm finds its job by
that dict (`for_hparams`): a job of another dict (an algorithm built outside train.py,
e.g. by a test or upstream's test_models) has none, and then the dict's own
`class_names` / `train_classes` serve.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from algorithms.core.context import JobContext

TRAIN_SCRIPT = "domainbed.scripts.train"


def train_args():
    """train.py's parsed arguments when this process is train.py, else None."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) != TRAIN_SCRIPT:
        return None
    return getattr(main, "args", None)


@dataclass
class DomainBedJob:
    hparams: dict
    dataset: object
    test_envs: tuple
    args: object = None  # train.py's, None outside it
    out_splits: dict = field(default_factory=dict)  # training env index -> its out-split

    @property
    def steps(self) -> Optional[int]:
        """train.py's --steps, else the dataset's N_STEPS (None outside train.py)."""
        if self.args is None:
            return None
        return getattr(self.args, "steps", None) or getattr(self.dataset, "N_STEPS", None)

    def environment_index(self, environment) -> Optional[int]:
        for i, env in enumerate(self.dataset.datasets):
            if env is environment:
                return i
        return None


_job: Optional[DomainBedJob] = None


def dataset_built(dataset, test_envs, hparams) -> DomainBedJob:
    """Called by the patched dataset constructors: this process's job is now this one."""
    global _job
    _job = DomainBedJob(hparams, dataset, tuple(test_envs), train_args())
    return _job


def current() -> Optional[DomainBedJob]:
    return _job


def for_hparams(hparams) -> Optional[DomainBedJob]:
    """The job whose dataset was built with this very dict, or None."""
    return _job if _job is not None and _job.hparams is hparams else None


def class_names(job: Optional[DomainBedJob], hparams) -> list:
    """The dataset's class names (class folders; placeholders for Debug datasets), else
    the `class_names` given in the hyperparameters (datasets without names: MNIST)."""
    names = getattr(job.dataset, "clipbench_class_names", None) if job else None
    return list(names or hparams.get("class_names") or [])


def context(method_cls, cfg, hparams, num_domains: int) -> JobContext:
    """The method's JobContext for the job that owns `hparams`."""
    job = for_hparams(hparams)
    names = class_names(job, hparams)
    if not names:
        raise ValueError(f"{method_cls.name}: the dataset gave no class names; "
                         "CLIP methods need an image-folder DomainBed dataset")
    train_classes = getattr(job.dataset, "base_classes", None) if job else None
    steps = job.steps if job else None
    if steps is None:
        from recipes import values
        steps = values(method_cls.name, "domainbed").get("steps")
    batch = hparams.get("batch_size")
    return JobContext.build(cfg, names, train_classes=train_classes or hparams.get("train_classes"),
                            total_steps=steps, where=method_cls.name,
                            images_per_step=batch * num_domains if batch else None,
                            domains_per_step=num_domains)


def reference_steps(method_cls, hparams) -> Optional[int]:
    """The recipe book's training length for the method on the job's dataset."""
    from recipes import values
    running = for_hparams(hparams)
    dataset = getattr(running.args, "dataset", None) if running and running.args else None
    return values(method_cls.name, "domainbed", dataset).get("steps")


def record(hparams, method, context: JobContext, digest: Optional[str]) -> None:
    """The one place that writes what DomainBed's records carry about the harness's
    method into the dict train.py records with each line (`hparams`): the class names,
    the resolved precision, the training classes of an open-world split, the job's steps
    and the run facts (common/run_facts.py). The method's config was built before and
    never reads it back."""
    from algorithms.core.config import as_dict
    from common.run_facts import run_facts
    job = for_hparams(hparams)
    hparams["class_names"] = list(context.class_names)
    hparams["precision"] = context.precision
    if context.train_classes < len(context.class_names):
        hparams["train_classes"] = context.train_classes
    if method.trains:
        hparams["total_steps"] = context.total_steps
    dataset = job.dataset if job else None
    domains = list(getattr(dataset, "ENVIRONMENTS", None) or []) or None
    args = job.args if job else None
    test_envs = list(job.test_envs) if job else []
    hparams["run"] = run_facts(
        protocol="domainbed_open" if getattr(dataset, "base_classes", None) else "domainbed",
        stage="train", method=method.name, config=as_dict(method.cfg),
        precision=context.precision, backbone=method.cfg.clip_model, weights_digest=digest,
        dataset=getattr(args, "dataset", None) or (type(dataset).__name__ if dataset else None),
        domains=domains,
        test_domains=[domains[i] for i in test_envs] if domains else None,
        seeds={k: getattr(args, k) for k in ("trial_seed", "hparams_seed", "seed")
               if args is not None and getattr(args, k, None) is not None},
        steps=job.steps if job else None)
