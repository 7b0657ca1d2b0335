"""DomainBed's Debug datasets (Debug28, Debug224: random tensors, 2 classes, no class
names) for the harness's algorithms, so that upstream's unit tests
(domainbed/test/test_models.py builds every registered algorithm on them, updates it
and checks the shape of its predictions) pass with the harness installed:
- hyperparameters: the tiny CLIP (`tiny-vit`, random weights: nothing is downloaded)
  with the recipe book's `tiny` values (recipes/recipes.yaml), as default and as every
  random draw;
- the dataset: placeholder class names (`class 0`, `class 1`; a `class_names` given in
  --hparams wins) and images at the model's size (`input_shape` follows the model, as
  for image folders). Upstream's algorithms see the datasets unchanged."""
from __future__ import annotations

DEBUG_DATASETS = ("Debug28", "Debug224")
TINY_MODEL = {"clip_model": "tiny-vit", "clip_pretrained": ""}


def placeholder_class_names(num_classes: int) -> list:
    return [f"class {i}" for i in range(num_classes)]


def patch_hparams(module) -> None:
    """Wrap hparams_registry._hparams: a harness algorithm on a Debug dataset runs on the
    tiny CLIP with its tiny_hparams."""
    import recipes
    from algorithms.core import registry
    upstream = module._hparams

    def _hparams(algorithm, dataset, random_seed):
        hparams = upstream(algorithm, dataset, random_seed)
        if dataset in DEBUG_DATASETS and algorithm in registry.methods():
            for key, value in {**TINY_MODEL, **recipes.values(algorithm, "tiny")}.items():
                if key in hparams:
                    hparams[key] = (value, value)
        return hparams

    module._hparams = _hparams


def patch_datasets(module) -> None:
    """Wrap datasets.Debug.__init__: class names and image size for harness algorithms
    (their hparams carry `clip_model`)."""
    import torch
    from torch.utils.data import TensorDataset

    from algorithms import backbone
    debug = module.Debug
    upstream_init = debug.__init__

    def __init__(self, root, test_envs, hparams):
        upstream_init(self, root, test_envs, hparams)
        if "clip_model" not in hparams:
            return
        from domainbed_adapter import job
        self.clipbench_class_names = (hparams.get("class_names")
                                      or placeholder_class_names(self.num_classes))
        size = backbone.image_size_of(hparams["clip_model"])
        if tuple(self.input_shape) != (3, size, size):
            self.input_shape = (3, size, size)
            self.datasets = [TensorDataset(torch.randn(len(env), *self.input_shape),
                                           env.tensors[1]) for env in self.datasets]
        job.dataset_built(self, test_envs, hparams)

    debug.__init__ = __init__
