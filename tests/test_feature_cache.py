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


def test_a_job_that_computed_meanwhile_takes_what_the_other_wrote(tmp_path):
    cache = FeatureCache(tmp_path, "features")
    key = {"data": {"dataset": "toy", "split": "val"}}

    def compute():  # another job finishes the same entry while this one computes
        FeatureCache(tmp_path, "features").save(key, {"x": torch.ones(2)})
        return {"x": torch.zeros(2)}
    assert torch.equal(cache.get_or_compute(key, compute)["x"], torch.ones(2))
    assert torch.equal(cache.load(key)["x"], torch.ones(2))


def test_batch_digest_is_exact_and_hashes_large_batches_in_chunks():
    from algorithms.core import feature_cache
    images = torch.randn(2, 3, 256, 256)  # 1.5 MB
    big = torch.randn(9, 3, 224, 224)     # 5.4 MB: two chunks, hashed in threads
    for x in (images, big):
        digest = feature_cache.batch_digest(x)
        assert digest == feature_cache.batch_digest(x.clone())
        for i in (0, x.numel() // 2, x.numel() - 1):  # one element, anywhere, by one ulp
            y = x.clone()
            y.view(-1)[i] = torch.nextafter(y.view(-1)[i], torch.tensor(float("inf")))
            assert feature_cache.batch_digest(y) != digest
        assert feature_cache.batch_digest(x.reshape(-1, *x.shape[2:])) != digest
        assert feature_cache.batch_digest(x.double()) != digest
    assert big.numel() * 4 > feature_cache.BATCH_DIGEST_CHUNK


# --- ZSCLIP's and CLIPLP's evaluation features (algorithms/core/method.py) -------------

import contextlib  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from open_clip.transformer import VisionTransformer  # noqa: E402

from algorithms.core.registry import get_method  # noqa: E402
from common import env as harness_env  # noqa: E402
from tests.conftest import TINY, needs_domainbed  # noqa: E402

IMAGES = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def encoder_calls(monkeypatch):
    """Counts image-tower forwards (every encoder call of every method)."""
    calls = []
    forward = VisionTransformer.forward

    def counted(self, x):
        calls.append(x.shape[0])
        return forward(self, x)
    monkeypatch.setattr(VisionTransformer, "forward", counted)
    return calls


def make(name, **overrides):
    method_cls = get_method(name)
    torch.manual_seed(0)  # the same random tiny CLIP in every "job"
    return method_cls.create(["circle", "square", "star"], {**TINY, **overrides})


def test_second_job_reads_zero_shot_features_instead_of_encoding(tmp_path, monkeypatch,
                                                                 encoder_calls):
    monkeypatch.setenv(harness_env.CACHE, str(tmp_path))
    with torch.no_grad():
        first = make("ZSCLIP").predict(IMAGES)
        assert len(encoder_calls) == 1
        second_job = make("ZSCLIP")
        again = second_job.predict(IMAGES)
        assert len(encoder_calls) == 1 and torch.equal(first, again)
        probe = make("CLIPLP", lp_init="zeroshot")  # same frozen encoder: same entries
        torch.testing.assert_close(probe.predict(IMAGES), first)
        assert len(encoder_calls) == 1
        files = list((tmp_path / "image_features" / "tiny-vit").glob("batch_fp32_*.pt"))
        assert len(files) == 1
        monkeypatch.setenv(harness_env.CACHE, "off")
        assert torch.equal(make("ZSCLIP").predict(IMAGES), first)  # cached = recomputed
        assert len(encoder_calls) == 2
        monkeypatch.setenv(harness_env.CACHE, str(tmp_path))
        # what must miss: other pixels (e.g. another augmentation), precision, weights
        second_job.predict(IMAGES.flip(-1))
        assert len(encoder_calls) == 3
        make("ZSCLIP", precision="bf16").predict(IMAGES)
        assert len(encoder_calls) == 4
        proj = second_job.clip.visual.proj  # weights changed in place: a new digest
        proj.add_(0.1 * torch.randn(proj.shape, generator=torch.Generator().manual_seed(0)))
        changed = second_job.predict(IMAGES)
        assert len(encoder_calls) == 5 and not torch.allclose(changed, first)
        make("ZSCLIP", clip_pretrained="").predict(IMAGES[:4])
        assert len(encoder_calls) == 6
    assert not list(tmp_path.rglob("*.tmp*"))


def test_linear_probe_encodes_its_training_batches_and_caches_only_evaluation(
        tmp_path, monkeypatch, encoder_calls):
    monkeypatch.setenv(harness_env.CACHE, str(tmp_path))
    probe = make("CLIPLP")
    labels = torch.tensor([0, 1, 2, 0, 1])
    for _ in range(2):
        probe.update(IMAGES, labels)
    assert len(encoder_calls) == 2 and not list(tmp_path.rglob("*.pt"))
    with torch.no_grad():
        first, again = probe.predict(IMAGES), probe.predict(IMAGES)
    assert len(encoder_calls) == 3 and torch.equal(first, again)
    assert len(list(tmp_path.rglob("*.pt"))) == 1


def _train_job(args):
    """DomainBed's train.py in this process (its own __main__), stdout/stderr restored."""
    saved = sys.argv, sys.stdout, sys.stderr
    sys.argv = ["train.py", *args]
    try:
        runpy.run_module("domainbed.scripts.train", run_name="__main__", alter_sys=True)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                if stream not in saved:
                    stream.file.close()  # misc.Tee's log file
        sys.argv, sys.stdout, sys.stderr = saved


@needs_domainbed
def test_second_domainbed_job_reads_features_instead_of_encoding(small_world, tmp_path,
                                                                 monkeypatch, encoder_calls):
    import domainbed.algorithms  # noqa: F401  (patched: the harness's algorithms, datasets)
    import domainbed.datasets  # noqa: F401
    import domainbed.hparams_registry  # noqa: F401
    import domainbed.lib.fast_data_loader  # noqa: F401
    from domainbed_adapter import patches
    patches.patch_loaded()
    monkeypatch.setenv(harness_env.CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv(harness_env.NUM_WORKERS, "0")
    hparams = json.dumps({**TINY, "data_augmentation": False})  # every batch repeats
    counts, records = [], []
    for job in ("job1", "job2"):  # two sweep jobs: other hparams_seed, same data and seed
        before = len(encoder_calls)
        _train_job(["--algorithm", "ZSCLIP", "--dataset", "CLIPWorld", "--data_dir",
                    str(small_world["domainbed_root"]), "--test_envs", "0", "--steps", "1",
                    "--output_dir", str(tmp_path / job), "--hparams", hparams,
                    "--hparams_seed", "0" if job == "job1" else "1"])
        counts.append(len(encoder_calls) - before)
        records.append(json.loads((tmp_path / job / "results.jsonl").read_text().splitlines()[-1]))
    assert counts[0] > 0 and counts[1] == 0, counts
    accuracies = [{k: v for k, v in r.items() if k.endswith("_acc")} for r in records]
    assert accuracies[0] and accuracies[0] == accuracies[1]
    assert all(r["hparams"]["precision"] == "fp32" for r in records)


# --- the other input-side cost: data-loader workers per DomainBed environment ----------

def test_loader_workers_follow_the_machine_unless_set(monkeypatch):
    monkeypatch.delenv(harness_env.NUM_WORKERS, raising=False)
    for cpus, environments, workers in ((2, 4, 0), (16, 4, 4), (64, 4, 8), (12, 5, 2)):
        monkeypatch.setattr(harness_env.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert harness_env.workers_per_environment(environments) == workers
    monkeypatch.setenv(harness_env.NUM_WORKERS, "3")
    assert harness_env.workers_per_environment(4) == 3


@needs_domainbed
def test_domainbed_dataset_takes_its_workers_from_the_machine(small_world, monkeypatch):
    import domainbed.datasets
    from domainbed_adapter import patches
    patches.patch_loaded()
    monkeypatch.delenv(harness_env.NUM_WORKERS, raising=False)
    monkeypatch.setattr(harness_env.os, "sched_getaffinity", lambda pid: set(range(16)))
    dataset = domainbed.datasets.CLIPWorld(str(small_world["domainbed_root"]), [0],
                                           {**TINY, "data_augmentation": True})
    assert dataset.N_WORKERS == min(8, 16 // len(dataset.datasets))
