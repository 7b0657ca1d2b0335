"""CLIP alignment and robustness methods, one module each, found by discovery
(core/registry.py) and shared by the DomainBed (domainbed_adapter/) and Dassl/CoOp
(trainers/) adapters and the demo (sweeps/demo.py).

- a method: one module here with a `@register_method` class (see core/method.py for
  what it declares); its formulas, defaults and deviations: docs/methods/<name>.md;
- core/: the method contract, registry, hyperparameters, selection protocol, feature cache;
- backbone/: open_clip loading, CLIP transforms, text classifiers, attention taps.
Nothing here imports from sweeps/, results/, clipworld/ or pretraining/.
"""
