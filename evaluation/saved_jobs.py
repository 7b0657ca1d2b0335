"""A finished DomainBed job's harness method, rebuilt from its `model.pkl` (DomainBed saves
{"args", "model_hparams", "model_dict"}; the adapter's state dict holds the method under
`method.`), on the device and at the precision an analysis asks for: used by
evaluation/wise_ft.py and evaluation/domain_gap.py."""
from __future__ import annotations

PREFIX = "method."  # the adapter's name for the method in DomainBed's model_dict


def method_values(method_cls, hparams: dict, precision: str) -> dict:
    """The job's method configuration (its run facts' `config`, else its declared
    hyperparameters in the saved dict) at the precision asked for."""
    facts = hparams.get("run") if isinstance(hparams.get("run"), dict) else {}
    declared = method_cls.hparams()
    values = dict(facts.get("config") or {k: v for k, v in hparams.items() if k in declared})
    return {**{k: v for k, v in values.items() if k in declared}, "precision": precision}


def create_method(method_cls, hparams: dict, values: dict, device: str):
    """`method_cls` built as the job built it (its classes, steps and training classes),
    with `values`, before any training."""
    return method_cls.create(hparams["class_names"], values, device=device,
                             total_steps=hparams.get("total_steps"),
                             train_classes=hparams.get("train_classes"))


def method_state(saved: dict) -> dict:
    """The method's state dict out of a loaded model.pkl."""
    return {k[len(PREFIX):]: v for k, v in saved["model_dict"].items() if k.startswith(PREFIX)}
