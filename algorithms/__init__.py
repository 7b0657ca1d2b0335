"""CLIP alignment and robustness methods, one module each (ComAlign: one package,
comalign/), found by discovery (core/registry.py) and shared by the DomainBed
(domainbed_adapter/) and Dassl/CoOp (trainers/) adapters and the demo (sweeps/demo.py).

- a method: one module here with a `@register_method` class declaring `hparams()` (its
  defaults; read as `self.cfg.<name>`), `trains` (then `loss()` and
  `trainable_parameters()`) and `selects_on` (core/method.py); per-dataset, per-protocol
  and tiny-model values are in the recipe book (recipes/recipes.yaml), not here; its
  formulas, defaults and deviations: docs/methods/<name>.md;
- core/: the method and training contract (method.py), registry, hyperparameter
  declarations (hparams.py) and the typed config built from them (config.py), the job
  context (context.py), precision, selection protocol, feature cache;
- backbone/: open_clip loading, CLIP transforms, text classifiers, attention taps.
Nothing here imports from the adapters, recipes/, sweeps/, results/, evaluation/,
clipworld/ or pretraining/.
"""
