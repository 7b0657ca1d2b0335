"""The shared feature cache (algorithms/core/feature_cache.py): atomic entries, keys."""
import threading

import torch

from algorithms.core.feature_cache import FeatureCache


def test_entries_round_trip_and_other_keys_miss(tmp_path):
    cache = FeatureCache(tmp_path, "features")
    key = {"clip_model": "tiny-vit", "data": {"dataset": "toy", "split": "val"}}
    computed = []
    first = cache.get_or_compute(key, lambda: computed.append(1) or {"x": torch.ones(2)})
    again = cache.get_or_compute(key, lambda: computed.append(1) or {"x": torch.zeros(2)})
    assert computed == [1] and torch.equal(first["x"], again["x"])
    assert cache.path(key).parent == tmp_path / "features" / "tiny-vit"
    assert cache.path(key).name.startswith("toy_val_")
    assert cache.load({**key, "clip_model": "other"}) is None


def test_foreign_file_under_the_same_name_is_not_taken(tmp_path):
    cache = FeatureCache(tmp_path, "features")
    key = {"data": {"dataset": "toy"}}
    cache.path(key).parent.mkdir(parents=True)
    torch.save({"x": torch.ones(1), "key_digest": "something else"}, cache.path(key))
    assert cache.load(key) is None


def test_concurrent_cache_writes_never_expose_a_partial_file(tmp_path):
    cache = FeatureCache(tmp_path, "scores")
    key = {"dataset": "toy", "split": "val", "data": {"dataset": "toy"}}
    scores = {k: torch.randn(200, 50) for k in ("s0", "s2", "s3")}
    scores["labels"] = torch.arange(200)
    writers = [threading.Thread(target=lambda: [cache.save(key, scores) for _ in range(5)])
               for _ in range(3)]
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        loaded = cache.load(key)
        assert loaded is None or torch.equal(loaded["s0"], scores["s0"])
    for w in writers:
        w.join()
    assert torch.equal(cache.load(key)["s3"], scores["s3"])
    assert not list(tmp_path.rglob("*.tmp*"))
