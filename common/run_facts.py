"""What every run records about itself, so that a collector reads fields and never
guesses: one schema for DomainBed jobs, Dassl runs, pretraining runs and ComAlign
evaluations.

    facts = run_facts(protocol="domainbed", stage="test", method="CLIPood", config={...},
                      precision="fp32", backbone="tiny-vit", weights_digest="...",
                      dataset="CLIPWorld", domains=[...], test_domains=[...],
                      seeds={"trial_seed": 0, "hparams_seed": 0})

Fields (all present in every record; None where a run has no such thing):
- protocol: domainbed | domainbed_open | dassl | base2new | cross_dataset |
  domain_generalization | pretraining | comalign
- stage: what the numbers are of (train, test, base, new, source, target, eval)
- method, config (the resolved configuration, JSON), precision (resolved: bf16 | fp16 |
  fp32 | amp | None), backbone (model name), weights_digest (of the weights the run
  started from: a file's sha256 or a state dict's digest), dataset, domains (all),
  test_domains (held out), seeds ({name: int}), steps (the run's optimisation steps;
  a DomainBed job's last record is at step `steps - 1`), commit (the harness's git commit, with
  "+dirty" when the work tree differs; None outside a git checkout).
A collector never pools two records whose `precision` or `backbone` differ.
"""
from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Mapping, Optional, Sequence

SCHEMA = "clipbench-run-v1"
PROTOCOLS = ("domainbed", "domainbed_open", "dassl", "base2new", "cross_dataset",
             "domain_generalization", "pretraining", "comalign")
FIELDS = ("schema", "protocol", "stage", "method", "config", "precision", "backbone",
          "weights_digest", "dataset", "domains", "test_domains", "seeds", "steps", "commit")
REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def harness_commit() -> Optional[str]:
    """The harness's git commit ("<sha>+dirty" with uncommitted changes to tracked
    files), or None when this is not a git checkout or git is missing."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def file_digest(path) -> Optional[str]:
    """sha256 of a file's bytes ("sha256:<hex>"), or None when there is no such file."""
    path = Path(path) if path else None
    if path is None or not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def run_facts(*, protocol: str, stage: Optional[str], method: Optional[str],
              config: Optional[Mapping] = None, precision: Optional[str] = None,
              backbone: Optional[str] = None, weights_digest: Optional[str] = None,
              dataset: Optional[str] = None, domains: Optional[Sequence[str]] = None,
              test_domains: Optional[Sequence[str]] = None,
              seeds: Optional[Mapping[str, int]] = None, steps: Optional[int] = None) -> dict:
    """The facts block of one run's record (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"run facts: protocol {protocol!r} not in {PROTOCOLS}")
    return {"schema": SCHEMA, "protocol": protocol, "stage": stage, "method": method,
            "config": dict(config or {}), "precision": precision, "backbone": backbone,
            "weights_digest": weights_digest, "dataset": dataset,
            "domains": list(domains) if domains is not None else None,
            "test_domains": list(test_domains) if test_domains is not None else None,
            "seeds": {k: int(v) for k, v in (seeds or {}).items()},
            "steps": int(steps) if steps is not None else None,
            "commit": harness_commit()}


def check_facts(facts, where: str) -> dict:
    """`facts` when it is a run-facts block of this schema, else ValueError naming `where`
    and what is wrong (for collectors)."""
    if not isinstance(facts, dict):
        raise ValueError(f"{where}: no run facts (expected an object with {', '.join(FIELDS)})")
    missing = [f for f in FIELDS if f not in facts]
    if missing:
        raise ValueError(f"{where}: run facts lack {', '.join(missing)}")
    if facts["schema"] != SCHEMA:
        raise ValueError(f"{where}: run facts of schema {facts['schema']!r}, expected {SCHEMA!r}")
    return facts
