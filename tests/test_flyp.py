"""FLYP: the contrastive loss on a hand-computed example, captions from templates, what
trains, predictions from the fine-tuned text tower, a DomainBed job and a Dassl run on
the generated world."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from algorithms import backbone
from algorithms.core.registry import get_method
from algorithms.flyp import contrastive_loss
from tests.conftest import (TINY, base_then_new, job_records, needs_coop, needs_domainbed,
                            train_domainbed)

CLASSES = ["circle", "square", "star"]
BATCH = (torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
         torch.tensor([0, 1, 2, 0, 1, 2]))


def make(**overrides):
    torch.manual_seed(0)
    return get_method("FLYP").create(CLASSES, {**TINY, **overrides}, total_steps=10)


def test_contrastive_loss_by_hand():
    eye = torch.eye(2)
    # logits = I: each direction's CE is -log(e / (e + 1)) per row
    assert contrastive_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + 1 / math.e), rel=1e-6)
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two images with the same feature
    # logits 2 * I T^T = [[2, 0], [2, 0]]: images -> texts rows target 0 and 1,
    # texts -> images rows [2, 2] and [0, 0]: log 2 each
    image_to_text = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    expected = (image_to_text + math.log(2)) / 2
    assert contrastive_loss(images, eye, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_captions_are_class_prompts_drawn_from_the_templates():
    one = make()
    tokens = one.tokenizer([f"a photo of a {c}." for c in CLASSES])
    assert torch.equal(one.batch_captions(BATCH[1]), tokens[BATCH[1]])
    many = make(templates="simple_imagenet")
    templates = backbone.resolve_templates("simple_imagenet")
    torch.manual_seed(3)
    drawn = many.batch_captions(BATCH[1])
    for caption, label in zip(drawn, BATCH[1]):
        options = many.tokenizer([t.format(CLASSES[label]) for t in templates])
        assert any(torch.equal(caption, option) for option in options)


def test_loss_is_clips_over_images_and_their_captions():
    method = make()
    images, labels = BATCH
    loss, _ = method.loss(images, labels)
    with torch.no_grad():
        image_features = F.normalize(method.clip.encode_image(images), dim=-1)
        text_features = F.normalize(method.clip.encode_text(method.captions[labels, 0]), dim=-1)
        expected = contrastive_loss(image_features, text_features, method.clip.logit_scale.exp())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_both_towers_and_the_logit_scale_train():
    method = make(lr=1e-3)
    before = {k: v.clone() for k, v in method.clip.state_dict().items()}
    method.train()
    assert method.clip.training  # nothing frozen, train mode as the reference
    method.update(*BATCH)
    changed = {k for k, v in method.clip.state_dict().items() if not torch.equal(v, before[k])}
    assert "logit_scale" in changed and "token_embedding.weight" in changed
    assert any(k.startswith("visual.") for k in changed)
    assert any(k.startswith("transformer.") for k in changed)
    assert "clip.text_projection" in method.state_dict()  # the checkpoint holds both towers


def test_predictions_use_the_fine_tuned_text_tower():
    method = make(lr=1e-3)
    method.eval()
    images = BATCH[0]
    zero_shot = get_method("ZSCLIP").predict(method, images)
    torch.testing.assert_close(method.predict(images), zero_shot)  # before training: ZSCLIP
    method.train()
    for _ in range(3):
        method.update(*BATCH)
    method.eval()
    with torch.no_grad():
        head = backbone.text_classifier(method.clip, method.tokenizer, CLASSES, "photo")
        expected = method.clip.logit_scale.exp() * F.normalize(
            method.clip.encode_image(images), dim=-1) @ head.T
        assert not torch.allclose(head, method.class_embeddings)  # the text tower moved
        torch.testing.assert_close(method.predict(images), expected)


def test_text_head_follows_loads_and_weight_averages():
    trained = make(lr=1e-3).train()
    for _ in range(2):
        trained.update(*BATCH)
    trained.eval()
    loaded = make().eval()
    loaded.predict(BATCH[0])  # its zero-shot head, computed before the load
    loaded.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(BATCH[0]), trained.predict(BATCH[0]))
    # an average that stays at the starting weights predicts as before training, one that
    # follows the last weights as the plain run: the head is the averaged text tower's
    start, last = make(lr=1e-3, averaging="ema", ema_decay=1 - 1e-9), make(lr=1e-3, averaging="ema", ema_decay=0.0)
    with torch.no_grad():
        before = start.eval().predict(BATCH[0])
    for method in (start, last):
        for _ in range(2):  # a prediction after each step: the head must not go stale
            method.train().update(*BATCH)
            with torch.no_grad():
                method.eval().predict(BATCH[0])
    with torch.no_grad():
        torch.testing.assert_close(start.predict(BATCH[0]), before)
        torch.testing.assert_close(last.predict(BATCH[0]), trained.predict(BATCH[0]))

@needs_domainbed
def test_domainbed_job_trains_the_whole_clip(small_world, tmp_path):
    out = tmp_path / "job"
    result = train_domainbed("FLYP", small_world, out, {**TINY, "batch_size": 8},
                             "--test_envs", "1", "--steps", "3", "--checkpoint_freq", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = job_records(out)
    assert [r["step"] for r in records] == [0, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert 0.0 <= records[-1]["env1_out_acc"] <= 1.0
    saved = torch.load(out / "model.pkl", weights_only=True)["model_dict"]
    assert "method.clip.logit_scale" in saved and "method.clip.text_projection" in saved


@needs_coop
def test_dassl_run_trains_and_evaluates_on_new_classes(small_world, tmp_path):
    base, new = base_then_new("FLYP", small_world, tmp_path)
    assert base.returncode == 0, base.stderr[-3000:]
    assert new.returncode == 0, new.stderr[-3000:]
    record = json.loads((tmp_path / "new" / "results.json").read_text())
    assert record["trainer"] == "FLYP" and record["subsample_classes"] == "new"
    assert 0.0 <= record["metrics"]["accuracy"] <= 100.0
