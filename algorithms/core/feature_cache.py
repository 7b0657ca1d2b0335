"""A cache of tensors computed by frozen encoders (features, CALIP's scores, later
ComAlign's components), shared by every method that encodes held-out or training data
with weights that do not change.

An entry is a dict of tensors stored under a digest of its key (a JSON-able dict that
names everything the tensors depend on: model, a fingerprint of its weights, the data's
items, split and transform, the method's settings). Files are written to a temporary
name and renamed, so concurrent sweep jobs never read half an entry; an unreadable or
foreign file is ignored and recomputed. When another job wrote the entry while this one
computed it, this one returns what the other wrote (every job then uses the same numbers).
Folder: $CLIPBENCH_CACHE (common/env.py; default data/feature_cache, `off` disables).

Users: CALIP's held-out scores (key: the adapter's description of the data),
ZSCLIP's and CLIPLP's evaluation features (key: a content digest of each batch,
algorithms/core/method.py `eval_features_key`), ComAlign's components.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from common import env
from common.files import atomic_path

Tensors = Dict[str, torch.Tensor]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tensors_fingerprint(tensors: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """A digest of named tensors' values (e.g. a model's state dict, a batch of images)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.cpu().view(torch.uint8).numpy())  # the buffer itself, no bytes copy
    return h.hexdigest()


BATCH_DIGEST_CHUNK = 4 << 20  # bytes hashed per thread task
_hash_pool: Optional[ThreadPoolExecutor] = None


def batch_digest(tensor: torch.Tensor) -> str:
    """A content digest of one tensor (a batch of images): sha256 over its shape, dtype and
    the sha256 of each 4 MB chunk of its bytes, the chunks hashed in parallel threads
    (hashlib releases the GIL). Exact like tensors_fingerprint (another value, another
    digest), a few times faster on a large batch."""
    global _hash_pool
    data = tensor.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy()
    chunks = [data[i:i + BATCH_DIGEST_CHUNK] for i in range(0, len(data), BATCH_DIGEST_CHUNK)]
    if len(chunks) > 1:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max_workers=min(16, env.usable_cpus()),
                                            thread_name_prefix="batch-digest")
        digests = list(_hash_pool.map(lambda c: hashlib.sha256(c).digest(), chunks))
    else:
        digests = [hashlib.sha256(c).digest() for c in chunks]
    h = hashlib.sha256(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(text)).strip("_")[:60] or "data"


class FeatureCache:
    """Entries of named tensors under `root/<kind>/<model>/<dataset>_<split>_<digest>.pt`."""

    def __init__(self, root, kind: str):
        self.root, self.kind = Path(root), kind

    @classmethod
    def from_env(cls, kind: str) -> Optional["FeatureCache"]:
        root = env.cache_root()
        return None if root is None else cls(root, kind)

    def path(self, key: dict) -> Path:
        data = key.get("data", {})
        prefix = f"{slug(data.get('dataset', 'data'))}_{slug(data.get('split', ''))}"
        return (self.root / self.kind / slug(key.get("clip_model", "model"))
                / f"{prefix}_{digest(key)[:24]}.pt")

    def load(self, key: dict) -> Optional[Tensors]:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file: recompute
            warnings.warn(f"ignoring unreadable cache file {path}: {e}")
            return None
        if not isinstance(entry, dict) or entry.pop("key_digest", None) != digest(key):
            return None
        return entry

    def save(self, key: dict, tensors: Tensors) -> Path:
        path = self.path(key)
        with atomic_path(path) as tmp:
            torch.save(dict(tensors, key_digest=digest(key)), tmp)
        return path

    def get_or_compute(self, key: dict, compute: Callable[[], Tensors],
                       name: str = "", verbose: bool = True) -> Tensors:
        cached = self.load(key)
        if cached is not None:
            if verbose:
                print(f"{name or self.kind}: read from {self.path(key)}")
            return cached
        tensors = compute()
        written = self.load(key)  # another job finished the same entry meanwhile: use it
        if written is not None:
            return written
        self.save(key, tensors)
        return tensors
