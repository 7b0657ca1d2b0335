"""A non-finite loss stops a job at that step, with one line naming the method, the
step and the loss term(s) that are not finite. Used by the DomainBed and Dassl adapters
around `method.update` (CLIPMethod.step refuses the step before any weight changes).

Terms are what a method's `loss(images, labels) -> (loss, summary)` names in its
summary (AlignCLIP: loss_cls, loss_aal, loss_last); they are recomputed once, without
gradients, on the batch whose step was refused. A method without `loss`, or whose
named terms are all finite, reports its total, `loss`.
"""
from __future__ import annotations

import math


def nonfinite_terms(method, images, labels) -> dict:
    """{term: value} of the terms of `method`'s loss on this batch that are not finite."""
    import torch
    loss_fn = getattr(method, "loss", None)
    if not callable(loss_fn):
        return {}
    try:
        with torch.no_grad():
            total, summary = loss_fn(images, labels)
        values = {k: float(v) for k, v in summary.items()}
        values["loss"] = float(total)
    except Exception:  # the message falls back to the total
        return {}
    bad = {k: v for k, v in values.items() if k != "loss" and not math.isfinite(v)}
    return bad or {k: v for k, v in values.items() if k == "loss" and not math.isfinite(v)}


def stop_message(name: str, where: str, terms: dict, stops: str = "job") -> str:
    named = ", ".join(f"{k} = {v}" for k, v in terms.items()) or "loss"
    return f"{name}: non-finite loss at {where}: {named}; the {stops} stops here"


def stopped(method, images, labels, where: str) -> FloatingPointError:
    """The error to raise (`from None`) when `method.update` refused a non-finite loss."""
    return FloatingPointError(stop_message(method.name, where,
                                           nonfinite_terms(method, images, labels)))
