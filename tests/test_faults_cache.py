"""Two processes writing the same FeatureCache entry at once (algorithms/core/
feature_cache.py): every read sees one writer's whole entry, never half of one or a mix;
both end with a correct value; no temporary file is left behind."""
import warnings

import torch

from tests import faults
from tests.conftest import PY

SIZE = 1 << 20  # 4 MB of float32 per entry: a write takes long enough to overlap
KEY = {"clip_model": "tiny-vit", "data": {"dataset": "world", "split": "test"}, "what": "race"}
SHARED = {**KEY, "what": "computed by both"}

WORKER = f"""
import os, sys, time, warnings
import torch
warnings.simplefilter("error")  # an unreadable entry would only warn: make it fail
from algorithms.core.feature_cache import FeatureCache
root, me, rounds, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cache = FeatureCache(root, "race")
open(go + f".ready{{me}}", "w").close()  # imports done: wait for the other writer
while not os.path.exists(go):
    time.sleep(0.005)
shared = cache.get_or_compute({SHARED!r}, lambda: {{"x": torch.arange({SIZE})}}, name="race")
assert torch.equal(shared["x"], torch.arange({SIZE})), "get_or_compute gave a wrong value"
seen = set()
for i in range(rounds):
    cache.save({KEY!r}, {{"features": torch.full(({SIZE},), float(me)),
                          "labels": torch.arange(10) + me}})
    got = cache.load({KEY!r})
    assert got is not None, "the entry was missing or unreadable"
    v = got["features"]
    assert v.shape == ({SIZE},) and bool((v == v[0]).all()), "a mixed or truncated entry"
    writer = int(v[0])
    assert writer in (1, 2) and torch.equal(got["labels"], torch.arange(10) + writer)
    seen.add(writer)
print("seen", *sorted(seen))
"""


def test_two_writers_of_one_entry_never_leave_it_corrupt(tmp_path):
    from algorithms.core.feature_cache import FeatureCache
    go = tmp_path / "go"
    workers = [faults.start([PY, "-c", WORKER, str(tmp_path / "cache"), str(me), "40", str(go)],
                            log=tmp_path / f"worker{me}.log") for me in (1, 2)]
    faults.wait_for(lambda: all((tmp_path / f"go.ready{me}").exists() for me in (1, 2)),
                    "both writers to be ready", timeout=300)
    go.touch()
    for me, worker in zip((1, 2), workers):
        assert worker.wait(timeout=600) == 0, (tmp_path / f"worker{me}.log").read_text()[-2000:]
    seen = [(tmp_path / f"worker{me}.log").read_text().split("seen")[-1].split() for me in (1, 2)]
    assert any(len(s) == 2 for s in seen), f"the writers never overlapped: {seen}"
    cache = FeatureCache(tmp_path / "cache", "race")
    final = cache.load(KEY)
    assert final is not None and int(final["features"][0]) in (1, 2)
    assert torch.equal(cache.load(SHARED)["x"], torch.arange(SIZE))
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert files == sorted([cache.path(KEY).name, cache.path(SHARED).name]), files


def test_an_interrupted_write_leaves_the_old_entry(tmp_path, monkeypatch):
    """A writer that dies inside torch.save: the entry keeps its old value, no temporary
    file remains, and a truncated file in the entry's place is ignored, not read."""
    from algorithms.core import feature_cache
    cache = feature_cache.FeatureCache(tmp_path, "race")
    cache.save(KEY, {"x": torch.zeros(3)})

    def dies(obj, f, *args, **kwargs):
        open(f, "wb").write(b"PK\x03\x04 half")  # what a killed torch.save leaves
        raise KeyboardInterrupt
    monkeypatch.setattr(feature_cache.torch, "save", dies)
    try:
        cache.save(KEY, {"x": torch.ones(3)})
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert torch.equal(cache.load(KEY)["x"], torch.zeros(3))
    assert [p.name for p in cache.path(KEY).parent.iterdir()] == [cache.path(KEY).name]
    cache.path(KEY).write_bytes(b"PK\x03\x04 half")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert cache.load(KEY) is None  # recomputed, not read
