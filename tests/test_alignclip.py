"""AlignCLIP, CLIPood, CLIPFT, CLIPLP: each loss against a small hand-computed example,
what trains, a short run lowering the loss, and the ablation switches."""
import math

import pytest
import torch
import torch.nn.functional as F

from algorithms import alignclip as ac
from algorithms.clipood import margin_logits
from algorithms.core.averaging import BetaMovingAverage
from algorithms.core.registry import get_method
from tests.conftest import TINY

E = math.e
EYE = torch.eye(2)


def test_margin_logits_by_hand():
    features = torch.tensor([[1.0, 0.0]])
    # f - 0.3 t_0 = (0.7, 0); logits = 10 * (0.7, 0)
    torch.testing.assert_close(margin_logits(features, EYE, torch.tensor([0]), 0.3, 10.0),
                               torch.tensor([[7.0, 0.0]]))


def test_semantic_label_smoothing_by_hand():
    sls = ac.sls_matrix(EYE, sharpness=1.0)  # softmax of rows of I
    hi, lo = E / (E + 1), 1 / (E + 1)
    torch.testing.assert_close(sls, torch.tensor([[hi, lo], [lo, hi]]))
    targets = ac.sls_targets(sls, torch.tensor([0, 1]), epsilon=0.9)
    torch.testing.assert_close(targets, torch.tensor([[0.9, lo], [lo, 0.9]]))  # not renormalised
    loss = ac.soft_cross_entropy(torch.zeros(2, 2), targets)
    assert loss.item() == pytest.approx((0.9 + lo) * math.log(2), rel=1e-6)


def test_layer_averaged_attention_by_hand():
    rows = [torch.tensor([[1.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.0]])]
    torch.testing.assert_close(ac.layer_averaged_attention(rows), torch.tensor([[0.625, 0.125, 0.25]]))


def test_attention_alignment_loss_by_hand():
    attention, target = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(g || a)
    assert ac.attention_alignment_loss(attention, target).item() == pytest.approx(expected, rel=1e-6)


def test_aal_target_by_hand():
    dv_patches = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # cos with t_y = (1, 0): (1, 0)
    target = ac.aal_target(dv_patches, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(target, torch.tensor([[E / (E + 1), 1 / (E + 1)]]))


def test_similarity_alignment_loss_by_hand():
    normal = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    dv = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    hi, lo = E / (E + 1), 1 / (E + 1)
    # class 0: normal (hi, lo), dv (1/2, 1/2); class 1: normal (lo, hi), dv (1/2, 1/2)
    per_class = 0.5 * math.log(0.5 / hi) + 0.5 * math.log(0.5 / lo)
    loss = ac.similarity_alignment_loss(normal, dv, EYE)
    assert loss.item() == pytest.approx(2 * per_class, rel=1e-6)


def test_beta_moving_average_is_the_weighted_mean_of_iterates():
    module = torch.nn.Linear(1, 1, bias=False)
    iterates = [1.0, 3.0, -2.0]
    with torch.no_grad():
        module.weight.fill_(iterates[0])
    bma = BetaMovingAverage(list(module.parameters()), beta=0.5, total_steps=10)
    for value in iterates[1:]:
        with torch.no_grad():
            module.weight.fill_(value)
        bma.update(list(module.parameters()))
    weights = [bma.weight(t) for t in range(3)]
    assert weights[0] == pytest.approx(torch.distributions.Beta(0.5, 0.5).log_prob(
        torch.tensor(0.5 / 11)).exp().item(), rel=1e-5)
    expected = sum(w * v for w, v in zip(weights, iterates)) / sum(weights)
    assert bma.average[0].item() == pytest.approx(expected, rel=1e-5)


def make(name, **overrides):
    torch.manual_seed(0)
    return get_method(name).create(["circle", "square", "star"], {**TINY, **overrides},
                                   total_steps=20)


BATCH = (torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
         torch.tensor([0, 1, 2, 0, 1, 2]))


@pytest.mark.parametrize("name", ["AlignCLIP", "CLIPood", "CLIPFT"])
def test_only_the_image_encoder_trains(name):
    method = make(name)
    before = {k: v.clone() for k, v in method.clip.state_dict().items()}
    method.train()
    method.update(*BATCH)
    changed = {k for k, v in method.clip.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    assert all(p.grad is None for n, p in method.clip.named_parameters() if not n.startswith("visual."))
    assert not method.clip.visual.training  # norm layers frozen as in the reference
    keys = method.state_dict().keys()
    assert not any(k.startswith("clip.") or "token_embedding" in k for k in keys)


def test_linear_probe_trains_only_its_head():
    method = make("CLIPLP")
    before = {k: v.clone() for k, v in method.clip.state_dict().items()}
    method.update(*BATCH)
    assert all(torch.equal(v, before[k]) for k, v in method.clip.state_dict().items())
    assert sorted(method.state_dict()) == ["head.bias", "head.weight"]
    zeroshot = make("CLIPLP", lp_init="zeroshot")
    torch.testing.assert_close(zeroshot.predict(BATCH[0]), get_method("ZSCLIP").predict(zeroshot, BATCH[0]))


@pytest.mark.parametrize("name", ["AlignCLIP", "CLIPood", "CLIPFT", "CLIPLP"])
def test_short_run_lowers_the_loss(name):
    method = make(name, lr=1e-3, **({"bma": False} if name != "CLIPLP" else {}))
    method.train()
    losses = [method.update(*BATCH)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0]


def test_alignclip_total_loss_is_the_weighted_sum():
    method = make("AlignCLIP")
    loss, summary = method.loss(*BATCH)
    expected = summary["loss_cls"] + 10 * (summary["loss_aal"] + summary["loss_last"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert method.attn_layers == (0, 1, 2, 3)  # 5 requested, tiny-vit has 4 blocks


def test_ablation_switches():
    images, labels = BATCH
    plain = make("AlignCLIP", loss_type="none", use_aal=False, use_last_alignment=False)
    loss, summary = plain.loss(images, labels)
    assert set(summary) == {"loss_cls"}
    ood = make("CLIPood")
    ood_loss, _ = ood.loss(images, labels)
    assert loss.item() == pytest.approx(ood_loss.item(), rel=1e-5)  # AlignCLIP minus both = CLIPood
    smoothed = make("AlignCLIP", loss_type="ls", use_aal=False, use_last_alignment=False)
    logits = margin_logits(F.normalize(smoothed.visual(images), dim=-1), smoothed.class_embeddings,
                           labels, 0.3, smoothed.logit_scale)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert smoothed.loss(images, labels)[0].item() == pytest.approx(expected.item(), rel=1e-5)
    vvv = make("AlignCLIP", dv_mode="vvv")
    assert vvv.loss(images, labels)[1]["loss_aal"] != pytest.approx(
        make("AlignCLIP").loss(images, labels)[1]["loss_aal"])
    detached, attached = make("AlignCLIP", detach_targets=True), make("AlignCLIP")
    assert detached.loss(images, labels)[0].item() == pytest.approx(attached.loss(images, labels)[0].item())
    with pytest.raises(ValueError, match="loss_type"):
        make("AlignCLIP", loss_type="focal")


def test_non_finite_loss_is_an_error(monkeypatch):
    method = make("CLIPood")
    monkeypatch.setattr(method, "loss", lambda x, y: (torch.tensor(float("nan")), {}))
    with pytest.raises(FloatingPointError, match="CLIPood: non-finite loss"):
        method.update(*BATCH)


def test_prediction_uses_the_moving_average():
    method = make("CLIPood", lr=1e-3)
    method.update(*BATCH)
    with torch.no_grad():
        live = method.logit_scale * F.normalize(method.visual(BATCH[0]), -1) @ method.class_embeddings.T
        averaged = method.predict(BATCH[0])
    assert not torch.allclose(live, averaged)
    reloaded = make("CLIPood")
    reloaded.load_state_dict(method.state_dict())
    torch.testing.assert_close(reloaded.predict(BATCH[0]), averaged)


def test_alignment_needs_a_vit_but_the_ablation_without_it_runs_on_resnets():
    with pytest.raises(NotImplementedError, match="need a ViT"):
        make("AlignCLIP", clip_model="tiny-rn")
    plain = make("AlignCLIP", clip_model="tiny-rn", use_aal=False, use_last_alignment=False)
    assert set(plain.update(*BATCH)) >= {"loss", "loss_cls"}
