"""ComAlign's component cache (docs/methods/comalign.md).

Cache. Component embeddings are computed once and kept in HDF5 files (h5py) under
$CLIPBENCH_CACHE/comalign/<model>/ (default data/feature_cache), keyed by a digest of
model, weight fingerprint, data items and component settings; written to a temporary
name and renamed (common.files.atomic_path), with a `complete` attribute written last,
so a half-written file is never read as complete (it is recomputed).
h5py is imported only when a cache file is read or written.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from algorithms.core.feature_cache import FeatureCache, digest, slug
from common.files import atomic_path

CACHE_KIND = "comalign"
CACHE_FORMAT = "comalign-components-v1"


class ComponentCache(FeatureCache):
    """The shared feature cache (algorithms/core/feature_cache.py) stored as HDF5, as the
    reference stores components: entries under `root/comalign/<model>/<data>_<side>_<digest>.h5`,
    a `complete` attribute written last."""

    def __init__(self, root, kind: str = CACHE_KIND):
        super().__init__(root, kind)

    @classmethod
    def from_env(cls, kind: str = CACHE_KIND) -> Optional["ComponentCache"]:
        return super().from_env(kind)

    def path(self, key: dict) -> Path:
        data = key.get("data", {})
        name = slug(data.get("name", "data")) if isinstance(data, dict) else "data"
        return self.root / self.kind / slug(key.get("clip_model", "model")) / \
            f"{name}_{key.get('side', '')}_{digest(key)[:24]}.h5"

    def load(self, key: dict) -> Optional[Dict[str, torch.Tensor]]:
        import h5py
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as f:
                if not f.attrs.get("complete", False) or f.attrs.get("key_digest") != digest(key):
                    return None
                return {k: torch.from_numpy(f[k][()]) for k in f.keys()}
        except Exception as e:  # truncated / foreign file: recompute
            warnings.warn(f"ignoring unreadable ComAlign cache file {path}: {e}")
            return None

    def save(self, key: dict, tensors: Dict[str, torch.Tensor]) -> Path:
        import h5py
        path = self.path(key)
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                for k, v in tensors.items():
                    f.create_dataset(k, data=v.numpy())
                f.attrs["key"] = json.dumps(key, sort_keys=True, default=str)
                f.attrs["key_digest"] = digest(key)
                f.attrs["format"] = CACHE_FORMAT
                f.attrs["complete"] = True  # last
        return path


def items_fingerprint(items: Sequence[str]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(str(it).encode() + b"\n")
    return h.hexdigest()


def cached_or_compute(cache: Optional[ComponentCache], key: dict, compute, name=""):
    return compute() if cache is None else cache.get_or_compute(key, compute, name)
