"""MIRO (algorithms/miro.py): the regulariser on a hand-computed example, the taps, the
frozen pre-trained copy, and a DomainBed job and a Dassl run on the generated world."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from algorithms import miro
from algorithms.backbone.taps import encode_image_layers, stage_ends
from algorithms.core.registry import get_method
from tests.conftest import (TINY, job_records, needs_coop, needs_domainbed, train_coop,
                            train_domainbed)

CLASSES = ["circle", "square", "star"]
BATCH = (torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
         torch.tensor([0, 1, 2, 0, 1, 2]))


def make(**overrides):
    torch.manual_seed(0)
    return get_method("MIRO").create(CLASSES, {**TINY, **overrides}, total_steps=20)


def test_regulariser_by_hand():
    # layer 1, tokens [B=1, N=1, C=2]: (f - f0)^2 = [1, 1], var = [1, e]
    #   elements [1/1 + 0, 1/e + 1], mean (2 + 1/e) / 2, halved: (2 + 1/e) / 4
    # layer 2, maps [B=1, C=1, H=1, W=2]: (f - f0)^2 = [4, 0], var = 2
    #   elements [2 + ln 2, 0 + ln 2], mean 1 + ln 2, halved: (1 + ln 2) / 2
    features = [torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[[3.0, 3.0]]]])]
    pre = [torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[[1.0, 3.0]]]])]
    variances = [torch.tensor([[[1.0, math.e]]]), torch.tensor([[[[2.0]]]])]
    expected = (2 + 1 / math.e) / 4 + (1 + math.log(2)) / 2
    assert miro.mi_regulariser(features, pre, variances).item() == pytest.approx(expected, rel=1e-6)
    # equal features leave log var / 2 per layer: the variances' pull towards zero
    same = miro.mi_regulariser(pre, pre, variances).item()
    assert same == pytest.approx((0 + 1) / 4 + math.log(2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="one pre-trained feature"):
        miro.mi_regulariser(features, pre[:1], variances)


def test_variance_encoder_is_per_channel_and_starts_at_the_references_value():
    assert miro.variance_shape((2, 96, 8, 8)) == (1, 96, 1, 1)
    assert miro.variance_shape((2, 65, 96)) == (1, 1, 96)
    with pytest.raises(ValueError, match="got shape"):
        miro.variance_shape((2, 96))
    encoder = miro.VarianceEncoder((2, 65, 4))
    var = encoder()
    assert var.shape == (1, 1, 4)
    torch.testing.assert_close(var, torch.full((1, 1, 4), 0.1), rtol=1e-6, atol=0)
    with torch.no_grad():
        encoder.b.fill_(0.0)
    torch.testing.assert_close(encoder(), torch.full((1, 1, 4), math.log(2) + 1e-5))


def test_taps_are_the_stem_and_the_stage_ends():
    from open_clip.transformer import VisionTransformer
    vit_b_depth = VisionTransformer(image_size=32, patch_size=16, width=32, layers=12, heads=2,
                                    mlp_ratio=2.0, output_dim=16)
    assert stage_ends(vit_b_depth) == ["conv1"] + [f"transformer.resblocks.{i}" for i in (2, 5, 8, 11)]
    method = make()
    assert method.tapped_layers == ("conv1", *(f"transformer.resblocks.{i}" for i in range(4)))
    assert [tuple(v.b.shape) for v in method.var_encoders] == [(1, 96, 1, 1)] + [(1, 1, 96)] * 4
    with torch.no_grad():
        pooled, taps = encode_image_layers(method.visual, BATCH[0], method.tapped_layers)
        assert torch.equal(pooled, method.visual(BATCH[0]))
    assert [tuple(t.shape) for t in taps] == [(6, 96, 8, 8)] + [(6, 65, 96)] * 4
    with pytest.raises(ValueError, match="no sub-module"):
        encode_image_layers(method.visual, BATCH[0], ["transformer.resblocks.9"])
    from algorithms import backbone
    resnet, _ = backbone.load_clip("tiny-rn", None)
    assert stage_ends(resnet.visual) == ["avgpool", "layer1", "layer2", "layer3", "layer4"]


def test_loss_is_cross_entropy_plus_lambda_times_the_regulariser():
    method = make(mi_lambda=0.5)
    images, labels = BATCH
    loss, summary = method.loss(images, labels)
    with torch.no_grad():
        logits = method.logit_scale * F.normalize(method.visual(images), dim=-1) @ method.class_embeddings.T
        assert summary["loss_cls"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    # before any step the fine-tuned taps are the pre-trained ones: 5 taps x log(0.1) / 2
    assert summary["loss_mi"] == pytest.approx(5 * math.log(0.1) / 2, rel=1e-5)
    assert loss.item() == pytest.approx(summary["loss_cls"] + 0.5 * summary["loss_mi"], rel=1e-6)
    assert miro.MIRO.hparams()["mi_lambda"].default == 0.1  # kakaobrain/miro config.yaml ld


def test_the_pretrained_copy_stays_frozen_and_out_of_checkpoints():
    method = make(lr=1e-3)
    frozen = {k: v.clone() for k, v in method.pretrained_visual.state_dict().items()}
    trained = {k: v.clone() for k, v in method.visual.state_dict().items()}
    variances = [v.b.detach().clone() for v in method.var_encoders]
    method.train()
    summaries = [method.update(*BATCH) for _ in range(3)]
    assert all({"loss", "loss_cls", "loss_mi"} <= set(s) for s in summaries)
    assert not method.pretrained_visual.training
    assert all(not p.requires_grad and p.grad is None for p in method.pretrained_visual.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in method.pretrained_visual.state_dict().items())
    assert any(not torch.equal(v, trained[k]) for k, v in method.visual.state_dict().items())
    assert all(not torch.equal(b, v.b) for b, v in zip(variances, method.var_encoders))
    groups = method.training_state.param_groups
    assert [len(g["params"]) for g in groups] == [len(list(method.visual.parameters())), 5]
    assert groups[1]["initial_lr"] == pytest.approx(10 * groups[0]["initial_lr"])  # lr_mult 10
    state = method.state_dict()
    assert {k.split(".")[0] for k in state} == {"visual", "var_encoders"}
    fresh = make()
    fresh.load_state_dict(state)
    assert all(torch.equal(v, frozen[k]) for k, v in fresh.pretrained_visual.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(BATCH[0]), method.predict(BATCH[0]))
        assert fresh.loss(*BATCH)[1]["loss_mi"] == pytest.approx(method.loss(*BATCH)[1]["loss_mi"])


@needs_domainbed
def test_domainbed_job_on_the_generated_world(small_world, tmp_path):
    out = tmp_path / "job"
    hparams = {**TINY, "batch_size": 8}
    result = train_domainbed("MIRO", small_world, out, hparams,
                             "--test_envs", "1", "--steps", "3", "--checkpoint_freq", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = job_records(out)
    assert [r["step"] for r in records] == [0, 2]
    assert {"loss", "loss_cls", "loss_mi"} <= set(records[-1])
    assert records[-1]["hparams"]["mi_lambda"] == 0.1 and records[-1]["args"]["algorithm"] == "MIRO"
    saved = torch.load(out / "model.pkl", weights_only=True)["model_dict"]
    assert {k.split(".")[1] for k in saved} == {"visual", "var_encoders"}


@needs_coop
def test_dassl_run_on_the_generated_world(small_world, tmp_path):
    out = tmp_path / "base"
    result = train_coop("MIRO", small_world, out, "DATASET.NUM_SHOTS", "2",
                        "DATASET.SUBSAMPLE_CLASSES", "base", "TRAINER.MIRO.MI_LAMBDA", "1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model" / "model.pth.tar-1").is_file()
    record = json.loads((out / "results.json").read_text())
    assert record["trainer"] == "MIRO" and 0 <= record["metrics"]["accuracy"] <= 100
    assert record["num_classes"] == 5
    assert record["run"]["method"] == "MIRO" and record["run"]["config"]["mi_lambda"] == 1.0
