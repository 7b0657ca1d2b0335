"""CALIP, CALIPOracle, CALIPFS: formulas against small hand-computed examples, what each
mode selects on in both harnesses, the score cache, and DomainBed / train_coop.py runs
(started together). The beta search itself: test_calip_search.py."""
import json
import math
import os
import types

import pytest
import torch

from algorithms import calip as cp
from algorithms import backbone, calip_search
from algorithms.core.registry import get_method
from common import env as harness_env
from tests.conftest import (TINY, needs_coop, needs_domainbed, train_coop, train_domainbed,
                            upstream_missing)

CLASSES = ["circle", "square", "star"]
E = math.e


@pytest.fixture(autouse=True)
def score_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(harness_env.CACHE, str(tmp_path / "cache"))
    return tmp_path / "cache"


def make(name, classnames=CLASSES, total_steps=None, **overrides):
    torch.manual_seed(0)
    method_cls = get_method(name)
    return method_cls.create(list(classnames), {**TINY, **overrides}, total_steps=total_steps)


# --- formulas -------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_scores_by_hand(scale):
    """F_v = e0, F_s = (e0, e1), F_t = (e0, e1): A = scale * I, sigma = softmax(scale, 0)[0].
    F_t^a = ((sigma, 1 - sigma), (1 - sigma, sigma)) -> S2 = (sigma, 1 - sigma);
    F_s^a the same rows -> F_v^a = mean + max = (1/2 + sigma) (1, 1) -> S3 = (1/2 + sigma)(1, 1)."""
    sigma = math.exp(scale) / (math.exp(scale) + 1)
    eye = torch.eye(2)
    scores = cp.calip_scores(eye[:1], eye[None], eye, attn_scale=scale)
    torch.testing.assert_close(scores.s0, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(scores.s2, torch.tensor([[sigma, 1 - sigma]]))
    torch.testing.assert_close(scores.s3, torch.tensor([[0.5 + sigma, 0.5 + sigma]]))
    torch.testing.assert_close(scores.combine(2.0, 0.5),
                               torch.tensor([[1 + 2 * sigma + 0.25 + 0.5 * sigma,
                                              2 * (1 - sigma) + 0.25 + 0.5 * sigma]]))


def _explicit_scores(global_feat, spatial, text, scale):
    """The formulas written out per image, with F_t^a formed explicitly."""
    s0, s2, s3 = [], [], []
    for f_v, f_s in zip(global_feat, spatial):
        attn = scale * f_s @ text.T                            # [P, C]
        f_t_a = attn.softmax(dim=0).T @ f_s                    # [C, D]
        f_s_a = attn.softmax(dim=1) @ text                     # [P, D]
        f_v_a = f_s_a.mean(dim=0) + f_s_a.max(dim=0).values
        s0.append(text @ f_v)
        s2.append(f_t_a @ f_v)
        s3.append(text @ f_v_a)
    return [torch.stack(s) for s in (s0, s2, s3)]


def test_scores_equal_the_explicit_formulas():
    torch.manual_seed(1)
    norm = torch.nn.functional.normalize
    global_feat, spatial, text = (norm(torch.randn(*shape), dim=-1)
                                  for shape in ((3, 8), (3, 5, 8), (4, 8)))
    scores = cp.calip_scores(global_feat, spatial, text, attn_scale=2.0)
    for got, want in zip((scores.s0, scores.s2, scores.s3),
                         _explicit_scores(global_feat, spatial, text, 2.0)):
        torch.testing.assert_close(got, want)


def test_calipfs_attention_equals_its_explicit_formula():
    torch.manual_seed(2)
    block = cp.CALIPFSAttention(8, hidden=(6, 5))
    global_feat, spatial, text = torch.randn(2, 8), torch.randn(2, 4, 8), torch.randn(3, 8)
    scores = block(global_feat, spatial, text)
    q_s, k_s, v_s = block.pre(spatial).chunk(3, dim=-1)
    q_t, k_t, v_t = block.pre(text).chunk(3, dim=-1)
    for b in range(2):
        attn_t = (q_t @ k_s[b].T / math.sqrt(8)).softmax(dim=1)      # over positions
        attn_s = (q_s[b] @ k_t.T / math.sqrt(8)).softmax(dim=1)      # over classes
        f_t_a = block.post(attn_t @ v_s[b])
        f_s_a = block.post(attn_s @ v_t)
        f_v_a = f_s_a.mean(dim=0) + f_s_a.max(dim=0).values
        torch.testing.assert_close(scores.s2[b], f_t_a @ global_feat[b])
        torch.testing.assert_close(scores.s3[b], text @ f_v_a)
        torch.testing.assert_close(scores.s0[b], text @ global_feat[b])


@pytest.mark.parametrize("model", ["tiny-vit", "tiny-rn"])
def test_zero_betas_are_zero_shot_clip_exactly(model):
    x = torch.randn(3, 3, 64, 64)
    calip = make("CALIP", clip_model=model, beta2=0.0, beta3=0.0)
    torch.manual_seed(0)
    zsclip = get_method("ZSCLIP").create(CLASSES, {**TINY, "clip_model": model})
    assert torch.equal(calip.predict(x), zsclip.predict(x))
    calip.betas.copy_(torch.tensor([1.12, 0.02], dtype=torch.float64))
    with torch.no_grad():
        pooled, spatial = backbone.encode_image_tokens(calip.clip, x)
        norm = torch.nn.functional.normalize
        scores = cp.calip_scores(norm(pooled, dim=-1), norm(spatial, dim=-1),
                                 calip.class_embeddings, 2.0)
    torch.testing.assert_close(calip.predict(x), calip.logit_scale * scores.combine(1.12, 0.02))


def test_resnet_spatial_tokens_come_from_the_attention_pool():
    torch.manual_seed(0)
    model, _ = backbone.load_clip("tiny-rn", None)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, spatial = backbone.encode_image_tokens(model, x)
        visual = model.visual
        features = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
        every_query = backbone.attention_pool_all_queries(visual.attnpool, features)
    assert torch.equal(pooled, model.encode_image(x))
    assert spatial.shape == (2, features.shape[2] * features.shape[3], model.visual.output_dim)
    torch.testing.assert_close(every_query[0], pooled)        # query 0 is CLIP's own output
    torch.testing.assert_close(every_query[1:].transpose(0, 1), spatial)


# --- what each mode selects on ------------------------------------------------------------

def _scores_best(method, batches):
    scores = [method.scores(x) for x, _ in batches]
    cat = lambda name: torch.cat([getattr(s, name) for s in scores])  # noqa: E731
    labels = torch.cat([y for _, y in batches])
    cfg = method.cfg
    return calip_search.grid_search(cat("s0"), cat("s2"), cat("s3"), labels,
                          calip_search.beta_grid(cfg.beta2_max, cfg.beta_grid, cfg.beta_min),
                          calip_search.beta_grid(cfg.beta3_max, cfg.beta_grid, cfg.beta_min)).best()


def test_validation_and_oracle_modes_select_on_their_own_data():
    torch.manual_seed(4)
    batches = [(torch.randn(6, 3, 64, 64), torch.randint(0, 3, (6,))) for _ in range(2)]
    calip, oracle = make("CALIP"), make("CALIPOracle")
    assert (calip.selects_on, calip.oracle) == ("validation", False)
    assert (oracle.selects_on, oracle.oracle) == ("test", True)
    assert calip.betas.tolist() == [1.12, 0.02]  # before any selection: the hparams
    with torch.no_grad():
        expected = _scores_best(calip, batches)
    summary = calip.select(iter(batches))
    assert (summary["beta2"], summary["beta3"], summary["select_acc"]) == expected
    assert calip.betas.tolist() == [expected[0], expected[1]]
    assert summary["select_images"] == 12
    assert oracle.select(iter(batches))["beta2"] == expected[0]
    assert set(calip.state_dict()) == {"betas"}  # the saved model: two floats


@needs_domainbed
def test_domainbed_validation_is_training_out_splits_and_oracle_gets_test_envs(small_world):
    import domainbed.algorithms
    import domainbed.datasets
    import domainbed.hparams_registry
    from domainbed.lib import misc
    from domainbed_adapter import data, job, patches
    patches.patch_loaded()
    hparams = dict(domainbed.hparams_registry.default_hparams("CALIP", "CLIPWorld"), **TINY)
    dataset = domainbed.datasets.CLIPWorld(small_world["domainbed_root"], [0], hparams)
    out_splits = []
    for i, env in enumerate(dataset):  # as DomainBed's train.py splits
        out, in_ = misc.split_dataset(env, int(len(env) * 0.2), misc.seed_hash(0, i))
        if i == 0:
            misc.split_dataset(in_, 0, misc.seed_hash(0, i))
        out_splits.append(out)
    _, key = data.held_out_data(job.for_hparams(hparams), "validation")
    expected = [dataset[i].samples[k] for i in (1, 2, 3) for k in out_splits[i].keys]
    assert [tuple(s) for s in key["items"]] == [tuple(s) for s in expected]
    assert "CenterCrop" in key["transform"] and "RandomResizedCrop" not in key["transform"]
    _, test_key = data.held_out_data(job.for_hparams(hparams), "test")
    assert [tuple(s) for s in test_key["items"]] == [tuple(s) for s in dataset[0].samples]

    minibatch = [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))]
    for name, images in (("CALIP", len(expected)), ("CALIPOracle", len(dataset[0]))):
        torch.manual_seed(0)
        algorithm = domainbed.algorithms.get_algorithm_class(name)((3, 64, 64), 10, 3, hparams)
        record = algorithm.update(minibatch)  # training-free: selects before the first step
        assert record["select_images"] == images
        assert record["beta2"] == algorithm.method.betas[0].item()
        assert set(algorithm.state_dict()) == {"method.betas"}


class _Loader(list):
    """A Dassl data loader as the adapter sees it: dict batches and .dataset."""

    def __init__(self, split, n):
        torch.manual_seed(len(split))
        labels = torch.arange(n) % 3
        super().__init__([{"img": torch.randn(n, 3, 64, 64), "label": labels}])
        items = [types.SimpleNamespace(impath=f"{split}/{i}.png", label=int(y))
                 for i, y in enumerate(labels)]
        self.dataset = types.SimpleNamespace(transform="eval transform", data_source=items)


@needs_coop
def test_dassl_validation_is_the_val_split_and_oracle_gets_the_test_split():
    import dassl.config
    from dassl.engine import TRAINER_REGISTRY
    from dassl.engine.trainer import TrainerBase
    from trainers import dassl_adapter
    dassl_adapter.register_trainers()
    for name, images in (("CALIP", 6), ("CALIPOracle", 9), ("CALIPFS", None)):
        cfg = dassl.config.get_cfg_default()
        dassl_adapter.add_method_configs(cfg)
        trainer = object.__new__(TRAINER_REGISTRY.get(name))
        TrainerBase.__init__(trainer)
        trainer.cfg, trainer.device = cfg, torch.device("cpu")
        trainer.model = make(name)
        trainer.val_loader, trainer.test_loader = _Loader("val", 6), _Loader("test", 9)
        summary = trainer.select_on_held_out()
        assert summary.get("select_images") == images, name


@needs_coop
def test_dassl_validation_avoids_a_val_split_that_is_the_test_split(tmp_path):
    """CoOp's ImageNet gives val = test: validation then uses training images."""
    import dassl.config
    from dassl.data.datasets import Datum
    from dassl.engine import TRAINER_REGISTRY
    from dassl.engine.trainer import TrainerBase
    from PIL import Image
    from trainers import dassl_adapter
    dassl_adapter.register_trainers()
    train = []
    for i in range(12):
        path = tmp_path / f"train{i}.png"
        Image.new("RGB", (64, 64), (20 * i, 0, 0)).save(path)
        train.append(Datum(impath=str(path), label=i % 3, classname=CLASSES[i % 3]))
    cfg = dassl.config.get_cfg_default()
    dassl_adapter.add_method_configs(cfg)
    cfg.INPUT.SIZE, cfg.DATALOADER.NUM_WORKERS = (64, 64), 0
    trainer = object.__new__(TRAINER_REGISTRY.get("CALIP"))
    TrainerBase.__init__(trainer)
    trainer.cfg, trainer.device, trainer.model = cfg, torch.device("cpu"), make("CALIP")
    trainer.val_loader = trainer.test_loader = _Loader("test", 9)
    trainer.test_loader.dataset.transform = backbone.clip_transform(64, train=False)
    trainer.dm = types.SimpleNamespace(dataset=types.SimpleNamespace(train_x=train))
    trainer.VAL_FROM_TRAIN_PER_CLASS = 2
    summary = trainer.select_on_held_out()
    assert summary["split"] == "train_as_val" and summary["select_images"] == 6


# --- the score cache ---------------------------------------------------------------------

class _NoData:
    def __iter__(self):
        raise AssertionError("the cache should have answered")


def test_cache_reuse_gives_identical_numbers(score_cache):
    torch.manual_seed(5)
    batches = [(torch.randn(8, 3, 64, 64), torch.randint(0, 3, (8,)))]
    key = {"dataset": "toy", "split": "val", "transform": "eval", "items": list(range(8))}
    first = make("CALIP")
    summary = first.select(batches, data_key=key)
    files = list(score_cache.rglob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("toy_val_")
    scores = first.held_out_scores(_NoData(), key)
    again = make("CALIP")  # another job: same model, weights and data
    assert again.select(_NoData(), data_key=key) == summary
    for name, value in again.held_out_scores(_NoData(), key).items():
        assert torch.equal(value, scores[name]), name
    with torch.no_grad():
        fresh = first.scores(batches[0][0])
    assert torch.equal(scores["s2"], fresh.s2)

    other_weights = make("CALIP", clip_pretrained="")
    torch.manual_seed(6)
    other_weights.clip.visual.proj.data.add_(1.0)
    with pytest.raises(AssertionError, match="cache should"):
        other_weights.held_out_scores(_NoData(), key)            # other weights: a miss
    with pytest.raises(AssertionError, match="cache should"):
        first.held_out_scores(_NoData(), {**key, "split": "test"})  # other split: a miss
    files[0].write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        assert torch.equal(first.held_out_scores(batches, key)["s0"], scores["s0"])
    assert not list(score_cache.rglob("*.tmp*"))


# --- CALIPFS ---------------------------------------------------------------------------

def test_calipfs_trains_only_its_attention_and_reloads():
    method = make("CALIPFS", total_steps=3)
    clip_before = {k: v.clone() for k, v in method.clip.state_dict().items()}
    attention_before = {k: v.clone() for k, v in method.attention.state_dict().items()}
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    losses = [method.update(x, y)["loss"] for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(torch.equal(v, clip_before[k]) for k, v in method.clip.state_dict().items())
    assert any(not torch.equal(v, attention_before[k])
               for k, v in method.attention.state_dict().items())
    state = method.state_dict()
    assert state and all(k.startswith("attention.") for k in state)
    fresh = make("CALIPFS")
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x), method.predict(x))


# --- DomainBed and train_coop.py runs, started together ------------------------------------



@pytest.fixture(scope="module")
def runs(small_world, tmp_path_factory):
    """One DomainBed job of CALIP and train_coop.py runs of CALIP and CALIPFS (base, then
    CALIPFS reloaded on new classes), one after the other (tests.conftest.run)."""
    tmp = tmp_path_factory.mktemp("calip_runs")
    env = {harness_env.CACHE: str(tmp / "cache")}
    results = {"dir": tmp}
    if not upstream_missing("DomainBed", "domainbed"):
        hparams = {**TINY, "beta_grid": 50}
        results["domainbed"] = train_domainbed("CALIP", small_world, tmp / "domainbed", hparams,
                                               "--test_envs", "0", "--steps", "1", env=env,
                                               timeout=300)
    if not (upstream_missing("Dassl.pytorch", "dassl") or upstream_missing("CoOp", "dassl")):
        results["calip"] = train_coop("CALIP", small_world, tmp / "calip" / "base",
                                      "DATASET.SUBSAMPLE_CLASSES", "base", env=env)
        results["calipfs_base"] = train_coop("CALIPFS", small_world, tmp / "calipfs" / "base",
                                             "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "2",
                                             "DATASET.SUBSAMPLE_CLASSES", "base", env=env)
        if results["calipfs_base"].returncode == 0:
            results["calipfs_new"] = train_coop(
                "CALIPFS", small_world, tmp / "calipfs" / "new", "--eval-only", "--model-dir",
                tmp / "calipfs" / "base", "--load-epoch", "2", "DATASET.SUBSAMPLE_CLASSES", "new",
                env=env)
    return results


@needs_domainbed
def test_domainbed_job_records_its_selection_and_saves_only_the_betas(runs, small_world):
    result, out = runs["domainbed"], runs["dir"] / "domainbed"
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    root = small_world["domainbed_dataset"]
    envs = sorted(os.listdir(root))[1:]  # --test_envs 0 is the first environment
    sizes = [sum(f.endswith(".png") for _, _, files in os.walk(os.path.join(root, env))
                 for f in files) for env in envs]
    assert record["select_images"] == sum(int(0.2 * n) for n in sizes)  # the out-splits
    defaults = cp.calip_hparams()  # the job's grid ends (its --hparams set only beta_grid)
    assert 0.001 <= record["beta2"] < defaults["beta2_max"].default
    assert 0.001 <= record["beta3"] < defaults["beta3_max"].default
    saved = torch.load(out / "model.pkl", weights_only=True)["model_dict"]
    assert list(saved) == ["method.betas"]
    assert saved["method.betas"].tolist() == [record["beta2"], record["beta3"]]
    assert list((runs["dir"] / "cache").rglob("CLIPWorld_out_*.pt"))


@needs_coop
def test_coop_calip_selects_on_the_val_split(runs, small_world):
    result = runs["calip"]
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((runs["dir"] / "calip" / "base" / "results.json").read_text())
    split = json.loads(open(small_world["coop_oxford_pets_split"]).read())
    num_base = math.ceil(len({item[1] for item in split["train"]}) / 2)
    assert record["selection"]["select_images"] == sum(item[1] < num_base for item in split["val"])
    assert f"accuracy: {record['metrics']['accuracy']:.1f}%" in result.stdout
    assert list((runs["dir"] / "cache").rglob("OxfordPets_val_*.pt"))


@needs_coop
def test_coop_calipfs_trains_on_base_and_reloads_on_new(runs):
    base = runs["calipfs_base"]
    assert base.returncode == 0, base.stderr[-3000:]
    assert (runs["dir"] / "calipfs" / "base" / "model" / "model.pth.tar-2").is_file()
    new = runs["calipfs_new"]
    assert new.returncode == 0, new.stderr[-3000:]
    assert "Loaded" in new.stdout and "* accuracy:" in new.stdout
    record = json.loads((runs["dir"] / "calipfs" / "new" / "results.json").read_text())
    assert record["subsample_classes"] == "new" and "selection" not in record
