"""Domain + class shift ("in the wild", CLIPood's `in_the_wild` task) through DomainBed's
own scripts: every image-folder dataset gets a variant `<Name>Open` (OfficeHomeOpen,
DomainNetOpen, CLIPWorldOpen, ...), run with an unchanged
`python -m domainbed.scripts.sweep launch --datasets OfficeHomeOpen ...`.

As thuml/CLIPood converter_domainbed.py: the classes are split by label index, the first
int((1 - open_ratio) * C) are "base", the rest "open" (hparams `open_ratio`, default 0.5).
- Training environments keep only their base-class images: training and model selection
  (their out-splits) never see an open class.
- A test environment keeps every image. Its out-split (the oracle's test-domain
  validation set) is drawn from its base-class images; its in-split holds the other
  base-class images (`env<t>_in_acc`: base accuracy) and its uda split every
  open-class image (`env<k>_uda_acc` for the k-th test environment: open accuracy),
  both classified among all classes (domainbed_adapter/data.py).
- the dataset's `base_classes` becomes the job context's `train_classes`
  (domainbed_adapter/job.py): the methods' training losses use the base classes' text
  classifier, their predictions every class's.
Why variants: DomainBed's train.py, sweep, selection and collect_results run as they are;
the open scores sit in keys its model selection does not read. Differences from CLIPood:
its base score covers all base images of the target domain (here the out-split's 20 %
is kept for the oracle), and `--task domain_adaptation` would hand the open-class
images to an algorithm as unlabeled data (the harness's methods ignore them).
"""
from __future__ import annotations

from domainbed_adapter import data

SUFFIX = "Open"
BASES = ("VLCS", "PACS", "OfficeHome", "TerraIncognita", "DomainNet", "CLIPWorld")
DEFAULT_OPEN_RATIO = 0.5


def base_class_count(num_classes: int, open_ratio: float) -> int:
    count = int((1 - open_ratio) * num_classes)
    if not 0 < count < num_classes:
        raise ValueError(f"open_ratio={open_ratio} leaves {count} of {num_classes} classes as "
                         "base classes: need at least one base and one open class")
    return count


def restrict_to_base_classes(environment, base_classes: int) -> None:
    """Keep only an ImageFolder environment's base-class images (label < base_classes)."""
    keep = [i for i, (_, label) in enumerate(environment.samples) if label < base_classes]
    environment.samples = [environment.samples[i] for i in keep]
    environment.imgs = environment.samples
    environment.targets = [environment.targets[i] for i in keep]


def register(datasets_module) -> None:
    for base in BASES:
        base_cls = getattr(datasets_module, base, None)
        name = base + SUFFIX
        if base_cls is None or hasattr(datasets_module, name):
            continue

        def __init__(self, root, test_envs, hparams, _base=base_cls):
            _base.__init__(self, root, test_envs, hparams)
            base_classes = base_class_count(self.num_classes,
                                            float(hparams.get("open_ratio", DEFAULT_OPEN_RATIO)))
            for i, environment in enumerate(self.datasets):
                if i in test_envs:
                    data.mark_open_test_env(environment, base_classes)
                else:
                    restrict_to_base_classes(environment, base_classes)
            self.base_classes = base_classes  # the job's training classes (job.py)

        variant = type(name, (base_cls,), {"__init__": __init__,
                                           "__module__": datasets_module.__name__})
        setattr(datasets_module, name, variant)
        if name not in datasets_module.DATASETS:
            datasets_module.DATASETS.append(name)
