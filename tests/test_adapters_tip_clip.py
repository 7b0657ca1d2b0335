"""CLIP-Adapter, Tip-Adapter / Tip-Adapter-F and DPL: their formulas on hand-computed
examples (the residual mix; the affinity and logits; the alpha/beta grid), the cache and
its search on validation data only, Tip-Adapter-F's keys training, DPL's prompt
generation; one DomainBed process running a job of each and one Dassl process running
few-shot runs (base-to-new where a method can predict new classes)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from algorithms import clip_adapter, dpl, tip_adapter
from algorithms.core.config import build_config
from algorithms.core.context import JobContext
from algorithms.core.registry import get_method
from common import env as harness_env
from tests.conftest import PY, REPO, TINY, needs_coop, needs_domainbed, run

CLASSES = ["circle", "square", "star"]
BATCH = (torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
         torch.tensor([0, 1, 2, 0, 1, 2]))
OTHER = (torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)),
         torch.tensor([2, 2, 1, 0]))


@pytest.fixture(autouse=True)
def no_feature_cache(monkeypatch):
    monkeypatch.setenv(harness_env.CACHE, "off")


def make(name, **overrides):
    torch.manual_seed(0)
    return get_method(name).create(CLASSES, {**TINY, **overrides}, total_steps=10)


# --- CLIP-Adapter -------------------------------------------------------------------

def test_clip_adapter_residual_mix_by_hand():
    adapter = clip_adapter.Adapter(2, reduction=2)
    with torch.no_grad():
        adapter.down.weight.copy_(torch.tensor([[1.0, -1.0]]))      # D/r = 1
        adapter.up.weight.copy_(torch.tensor([[2.0], [-1.0]]))
    f = torch.tensor([[3.0, 1.0]])
    # down: 3 - 1 = 2, ReLU 2; up: (4, -2), ReLU (4, 0)
    assert torch.equal(adapter(f), torch.tensor([[4.0, 0.0]]))
    mixed = clip_adapter.residual_mix(f, adapter(f), 0.25)
    assert torch.allclose(mixed, torch.tensor([[0.25 * 4 + 0.75 * 3, 0.75 * 1]]))


def test_clip_adapter_logits_and_what_trains():
    method = make("CLIPAdapter", lr=0.1)
    images, labels = BATCH
    with torch.no_grad():
        raw = method.clip.encode_image(images)
        features = F.normalize(raw, dim=-1)
        mixed = 0.2 * method.adapter(features) + 0.8 * features
        expected = method.logit_scale * F.normalize(mixed, dim=-1) @ method.class_embeddings.T
        torch.testing.assert_close(method.predict(images), expected)
        # the reference mixes the raw feature: the same logits (A(c f) = c A(f), c > 0)
        from_raw = 0.2 * method.adapter(raw) + 0.8 * raw
        torch.testing.assert_close(method.logit_scale * F.normalize(from_raw, dim=-1)
                                   @ method.class_embeddings.T, expected)
    clip_before = {k: v.clone() for k, v in method.clip.state_dict().items()}
    adapter_before = method.adapter.up.weight.detach().clone()
    loss, _ = method.loss(images, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(expected, labels).item(), rel=1e-5)
    method.update(images, labels)
    assert not torch.equal(method.adapter.up.weight, adapter_before)
    assert all(torch.equal(v, clip_before[k]) for k, v in method.clip.state_dict().items())
    assert set(method.state_dict()) == {"adapter.down.weight", "adapter.up.weight"}


# --- Tip-Adapter: formulas ------------------------------------------------------------

def test_tip_affinity_and_logits_by_hand():
    f = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 0.0]])  # 2 classes x 2 shots
    filled = torch.tensor([True, True, True, False])
    similarity = f @ keys.T                                  # 1, 0, 0.6, 0
    assert torch.allclose(tip_adapter.affinity(similarity, 2.0),
                          torch.tensor([[1.0, math.exp(-2), math.exp(-0.8), math.exp(-2)]]))
    cache = tip_adapter.cache_logits(similarity, filled, 2.0, shots=2)
    # class 0: slots 0, 1; class 1: slot 2 (slot 3 empty adds nothing)
    expected = torch.tensor([[1.0 + math.exp(-2), math.exp(-0.8)]])
    assert torch.allclose(cache, expected)
    clip_logits = torch.tensor([[0.5, 1.0]])
    assert torch.allclose(tip_adapter.tip_logits(clip_logits, cache, 3.0),
                          clip_logits + 3.0 * expected)


def test_reference_grid_and_first_best_pair():
    assert torch.allclose(tip_adapter.reference_grid(7.0, 200)[:3],
                          torch.tensor([0.1, 0.1345, 0.169], dtype=torch.float64))
    assert len(tip_adapter.reference_grid(3.0, 20)) == 20
    # one image of class 1, CLIP prefers class 0 by 1; its cache entry is class 1's
    features = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0]])           # slot 0: class 0, slot 1: class 1
    filled = torch.tensor([True, True])
    clip_logits = torch.tensor([[1.0, 0.0]])
    # cache logits: class 0 exp(-beta), class 1 1: right when alpha (1 - exp(-beta)) > 1
    alphas = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    betas = torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)
    alpha, beta, accuracy = tip_adapter.search_alpha_beta(
        clip_logits, features, keys, filled, torch.tensor([1]), 1, alphas, betas)
    # beta 0.1: 1 - e^-0.1 = 0.095, never; beta 1: 0.632, alpha 2 is the first that works
    assert (alpha, beta, accuracy) == (2.0, 1.0, 1.0)


# --- Tip-Adapter: the cache and the search on validation data ------------------------

def test_cache_fills_free_slots_per_class_in_batch_order():
    method = make("TipAdapter", cache_shots=2)
    features = F.normalize(torch.randn(5, method.keys.shape[1]), dim=-1)
    labels = torch.tensor([1, 0, 1, 1, 0])
    assert method.add_to_cache(features, labels) == 4  # class 1's third image: no slot
    assert method.filled.tolist() == [True, True, True, True, False, False]
    assert torch.equal(method.keys[[0, 1, 2, 3]], features[[1, 4, 0, 2]])
    assert torch.equal(method.keys[4:], torch.zeros(2, method.keys.shape[1]))
    assert method.add_to_cache(features[:1], torch.tensor([1])) == 0
    # update puts the encoded training batch in; nothing trains, nothing to optimise
    fresh = make("TipAdapter", cache_shots=2)
    summary = fresh.update(*BATCH)
    assert summary["cache_size"] == 6.0 and not fresh.has_trainable_parameters()
    with torch.no_grad():
        encoded = F.normalize(fresh.clip.encode_image(BATCH[0]), dim=-1)
    assert torch.allclose(fresh.keys, encoded[[0, 3, 1, 4, 2, 5]])


def test_alpha_beta_are_searched_on_validation_data_only(monkeypatch):
    method = make("TipAdapter", cache_shots=1, alpha_max=5.0, beta_max=5.0,
                  alpha_steps=5, beta_steps=8)
    method.update(BATCH[0][:3], BATCH[1][:3])  # one image per class: the cache is full
    assert method.alpha_beta.tolist() == [1.17, 1.0]  # init values before any search
    val_images, val_labels = BATCH[0][3:], BATCH[1][3:]
    chosen = method.select([(val_images, val_labels)])
    with torch.no_grad():
        val = F.normalize(method.clip.encode_image(val_images), dim=-1)
    expected = tip_adapter.search_alpha_beta(
        method.logit_scale * val @ method.class_embeddings.T, val, method.keys, method.filled,
        val_labels, 1, tip_adapter.reference_grid(5.0, 5), tip_adapter.reference_grid(5.0, 8))
    assert (chosen["alpha"], chosen["beta"], chosen["select_acc"]) == expected
    assert chosen["select_images"] == 3.0
    assert method.alpha_beta.tolist() == [expected[0], expected[1]]

    searched = []  # the labels every search scores against
    original = tip_adapter.search_alpha_beta
    monkeypatch.setattr(tip_adapter, "search_alpha_beta",
                        lambda *args: searched.append(args[4]) or original(*args))
    # predicting other (test) data, or a batch that finds no free slot: no search
    method.update(*OTHER)
    with torch.no_grad():
        method.predict(OTHER[0])
    assert searched == [] and method.alpha_beta.tolist() == [expected[0], expected[1]]
    # the cache grows: the next prediction searches again, on the kept validation data
    bigger = make("TipAdapter", cache_shots=2)
    bigger.update(BATCH[0][:3], BATCH[1][:3])
    bigger.select([(val_images, val_labels)])
    bigger.update(*OTHER)
    with torch.no_grad():
        bigger.predict(OTHER[0])
        bigger.predict(OTHER[0])
    assert len(searched) == 2 and all(torch.equal(s, val_labels) for s in searched)


def test_tip_adapter_f_trains_the_filled_keys_only():
    method = make("TipAdapterF", cache_shots=2, lr=1e-2)
    images, labels = BATCH[0][:4], BATCH[1][:4]       # classes 0, 1, 2, 0
    with torch.no_grad():
        encoded = F.normalize(method.clip.encode_image(images), dim=-1)
    # the loss: the batch joins the cache, then CE at init_alpha, init_beta
    loss, _ = method.loss(images, labels)
    similarity = encoded @ method.keys.detach().T
    cache = tip_adapter.cache_logits(similarity, method.filled, 1.0, 2)
    logits = method.logit_scale * encoded @ method.class_embeddings.T + 1.17 * cache
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert method.filled.tolist() == [True, True, True, False, True, False]
    summary = method.update(images[[0, 3]], labels[[0, 3]])  # class 0 is full: no new slot
    assert math.isfinite(summary["loss"]) and summary["cache_size"] == 4.0
    filled = method.filled
    moved = method.keys.detach()[filled]
    assert not torch.allclose(moved, encoded[[0, 3, 1, 2]])  # the filled keys trained
    assert torch.equal(method.keys.detach()[~filled], torch.zeros(int((~filled).sum()),
                                                                  encoded.shape[1]))
    assert set(method.state_dict()) == {"keys", "filled", "alpha_beta"}


# --- DPL ------------------------------------------------------------------------------

def test_dpl_prompt_generation_shapes_and_per_domain_contexts():
    cfg = build_config(get_method("DPL"), {**TINY, "num_domain_tokens": 4, "mlp_width": 32})
    torch.manual_seed(0)
    method = get_method("DPL")(cfg, JobContext.build(cfg, CLASSES, total_steps=5,
                                                      domains_per_step=2))
    images, labels = BATCH
    features = method.image_features(images)
    generated = method.generator(features)
    width = method.clip.token_embedding.weight.shape[1]
    assert generated.shape == (6, 4, width)
    contexts = dpl.domain_contexts(generated, 2)
    assert contexts.shape == (2, 4, width)
    torch.testing.assert_close(contexts[1], generated[3:].mean(dim=0))
    # the prompt: [SOS] ctx name . [EOS], the 4 X slots replaced, the rest the template
    prompts = dpl.assemble_prompts(contexts[:, None], method.template, method.order)
    assert prompts.shape == (2, 3) + method.template.shape[1:]
    torch.testing.assert_close(prompts[1, 2, 1:5], contexts[1])
    assert torch.equal(prompts[0, :, 5:], method.template[:, 5:])
    assert torch.equal(prompts[0, :, :1], method.template[:, :1])
    text = method.text_features(contexts, 3)
    assert text.shape == (2, 3, method.class_embeddings.shape[1])
    # each domain's images against their own domain's prompts
    method.eval()  # no dropout: the same generator output twice
    with torch.no_grad():
        logits = method.domain_logits(features, 2, 3)
        text = method.text_features(dpl.domain_contexts(method.generator(features), 2), 3)
        image = F.normalize(features, dim=-1)
        torch.testing.assert_close(logits[:3], method.logit_scale * image[:3] @ text[0].T)
        torch.testing.assert_close(logits[3:], method.logit_scale * image[3:] @ text[1].T)
    method.train()
    before = [p.detach().clone() for p in method.generator.parameters()]
    summary = method.update(images, labels)
    assert math.isfinite(summary["loss"])
    assert all(not torch.equal(b, p) for b, p in zip(before, method.generator.parameters()))
    assert not any(p.requires_grad for p in method.clip.parameters())


# --- the harnesses ----------------------------------------------------------------------

DOMAINBED_METHODS = ("TipAdapter", "TipAdapterF", "CLIPAdapter", "DPL")
DOMAINBED_DRIVER = """
import json, runpy, sys
for name in {names!r}:
    sys.argv = ["train.py", "--algorithm", name, "--dataset", "CLIPWorld", "--data_dir", {data!r},
                "--test_envs", "1", "--steps", "1", "--output_dir", {out!r} + "/" + name,
                "--hparams", {hparams!r}]
    runpy.run_module("domainbed.scripts.train", run_name="__main__", alter_sys=True)
"""


@needs_domainbed
def test_domainbed_jobs_of_each_method(small_world, tmp_path):
    """One process, one 1-step job per method (train.py run four times)."""
    hparams = json.dumps({**TINY, "batch_size": 8})
    driver = DOMAINBED_DRIVER.format(names=DOMAINBED_METHODS, data=small_world["domainbed_root"],
                                     out=str(tmp_path), hparams=hparams)
    result = run([PY, "-c", driver], cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for name in DOMAINBED_METHODS:
        records = [json.loads(line)
                   for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0], name
        assert records[-1]["hparams"]["run"]["method"] == name
        assert 0.0 <= records[-1]["env1_out_acc"] <= 1.0
        if name.startswith("Tip"):  # the cache holds the training domains' images
            assert records[-1]["cache_size"] == 8 * 3  # one batch of 8 per training domain
            assert records[-1]["alpha"] > 0 and records[-1]["beta"] > 0
        if get_method(name).trains:
            assert all(math.isfinite(r["loss"]) for r in records), name
    # the selection ran on the training domains' out splits (3 x 20% of 100 images)
    assert "on the validation data (60 images" in result.stdout


DASSL_DRIVER = """
import sys
from trainers.coop_runner import main
common = ["--root", {root!r}, "--dataset-config-file", {dataset!r}, "--config-file", {config!r},
          "--seed", "1"]
runs = [
    ["--trainer", "TipAdapter", "--output-dir", {out!r} + "/tip", "DATASET.NUM_SHOTS", "2"],
    ["--trainer", "TipAdapterF", "--output-dir", {out!r} + "/tipf", "DATASET.NUM_SHOTS", "2"],
    ["--trainer", "CLIPAdapter", "--output-dir", {out!r} + "/ca_base", "DATASET.NUM_SHOTS", "2",
     "DATASET.SUBSAMPLE_CLASSES", "base"],
    ["--trainer", "CLIPAdapter", "--output-dir", {out!r} + "/ca_new", "--eval-only",
     "--model-dir", {out!r} + "/ca_base", "--load-epoch", "1", "DATASET.SUBSAMPLE_CLASSES", "new"],
]
for args in runs:
    code = main(args[:2] + common + args[2:])
    if code:
        sys.exit(f"{{args}}: exit {{code}}")
"""


@needs_coop
def test_dassl_few_shot_runs(small_world, tmp_path):
    """Tip-Adapter(-F): the cache from the few-shot train split, alpha/beta from the val
    split; CLIP-Adapter: base-to-new. One process."""
    driver = DASSL_DRIVER.format(
        root=small_world["coop_root"], out=str(tmp_path),
        dataset=str(REPO / "third_party" / "CoOp" / "configs" / "datasets" / "oxford_pets.yaml"),
        config=str(REPO / "trainers" / "configs" / "backbones" / "tiny_vit.yaml"))
    result = run([PY, "-c", driver], cwd=REPO, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for folder, trainer in (("tip", "TipAdapter"), ("tipf", "TipAdapterF")):
        record = json.loads((tmp_path / folder / "results.json").read_text())
        assert record["trainer"] == trainer and record["split"] == "test"
        selection = record["selection"]
        # 2 shots x 10 classes in batches of 8: Dassl drops the short last batch
        assert selection["split"] == "val" and selection["cache_size"] == 16.0
        assert 0.0 <= record["metrics"]["accuracy"] <= 100.0
    new = json.loads((tmp_path / "ca_new" / "results.json").read_text())
    assert new["trainer"] == "CLIPAdapter" and new["subsample_classes"] == "new"
    assert 0.0 <= new["metrics"]["accuracy"] <= 100.0


def test_coop_protocols_refuse_unseen_classes_for_tip_adapter(tmp_path, capsys):
    from sweeps import coop_protocols
    if not (coop_protocols.COOP_DIR / "train.py").is_file():
        pytest.skip("CoOp is not installed (python third_party/install.py)")
    code = coop_protocols.main(["base2new", "--trainer", "TipAdapter", "--root", str(tmp_path),
                                "--output", str(tmp_path / "out")])
    assert code == 2 and "TipAdapter scores only the classes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
