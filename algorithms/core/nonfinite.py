"""A non-finite loss stops a job at that step, with one line naming the method, the
step and the loss term(s) that are not finite. The method refuses the step before any
weight changes (`CLIPMethod.step` raises `NonFiniteLoss` with the terms of its loss
summary, e.g. AlignCLIP's loss_cls, loss_aal, loss_last; the total `loss` when every
named term is finite); the DomainBed and Dassl adapters say where (`stopped`)."""
from __future__ import annotations


def named_terms(terms: dict) -> str:
    """'loss_cls = nan, loss_aal = inf' ('loss' when none is named)."""
    return ", ".join(f"{k} = {v}" for k, v in terms.items()) or "loss"


def stop_message(name: str, where: str, terms: dict, stops: str = "job") -> str:
    return f"{name}: non-finite loss at {where}: {named_terms(terms)}; the {stops} stops here"


def stopped(error, where: str) -> FloatingPointError:
    """The error to raise (`from None`) for a `NonFiniteLoss` raised at `where`."""
    return FloatingPointError(stop_message(error.method_name, where, error.terms))
