"""Weight averaging (algorithms/core/averaging.py): EMA and SWAD against hand-computed
averages of saved weights, SWAD's loss-valley window on a made-up loss sequence (the
reference's rule, kakaobrain/miro domainbed/swad.py), the old `bma` switch, and every
training method with each `averaging` value."""
import json

import pytest
import torch

from algorithms.core import averaging as avg
from algorithms.core.registry import get_method, methods
from tests.conftest import (TINY, job_records, needs_coop, needs_domainbed, train_coop,
                            train_domainbed)

# a made-up loss per segment s1..s15: falls to s5, a valley to s9, then rises
LOSSES = [5.0, 4.0, 3.0, 2.0, 1.0, 1.2, 1.1, 1.05, 1.3, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]


def scalar(value):
    return [torch.tensor([float(value)])]


def test_ema_is_the_hand_computed_average_of_saved_weights():
    saved = [2.0, 4.0, -1.0, 3.0]  # theta_0, then the weights after steps 1..3
    ema = avg.ExponentialMovingAverage(scalar(saved[0]), decay=0.5)
    for value in saved[1:]:
        ema.update(scalar(value))
    # ((2 * .5 + 4 * .5) * .5 + -1 * .5) * .5 + 3 * .5 = 2.0
    assert ema.average[0].item() == pytest.approx(2.0)


def test_swad_valley_window_on_a_made_up_loss_sequence():
    """n_converge 3, n_tolerance 6, tolerance 0.3 (the reference's defaults). s7 arrives:
    the window [s5, s6, s7] has its minimum first -> converged at s5, threshold
    mean(1, 1.2, 1.1) * 1.3 = 1.43; the segments before s5 go back to s4 (2.0 > 1.43), so
    nothing before s5 joins. s10..s14 each add the front of the last six (s5..s9), whose
    lowest loss is <= 1.43; at s15 the last six (s10..s15) are all above: dead valley."""
    valley = avg.LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    states = {}
    for i, loss in enumerate(LOSSES, start=1):
        valley.add(avg.Segment(scalar(i), i, i, loss))
        states[i] = (valley.converged, valley.dead)
    assert states[6] == (False, False) and states[7] == (True, False)
    assert valley.converge_step == 5 and valley.threshold == pytest.approx(1.43)
    assert states[14] == (True, False) and states[15] == (True, True)
    final = valley.final_average()
    assert (final.start, final.end, final.count) == (5, 9, 5)
    assert final.weights[0].item() == pytest.approx((5 + 6 + 7 + 8 + 9) / 5)


def test_swad_final_average_mid_run_and_before_convergence():
    valley = avg.LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    for i, loss in enumerate(LOSSES[:6], start=1):
        valley.add(avg.Segment(scalar(i), i, i, loss))
    assert valley.final_average().weights[0].item() == 6  # not converged: the last segment
    for i, loss in enumerate(LOSSES[6:11], start=7):
        valley.add(avg.Segment(scalar(i), i, i, loss))
    # after s11 the window holds s5, s6; closing it adds s7, s8, s9 (the lowest loss of
    # the rest stays <= 1.43 until only s10 (2.0), s11 (2.5) are left)
    final = valley.final_average()
    assert (final.start, final.end) == (5, 9)
    assert final.weights[0].item() == pytest.approx(7.0)
    assert valley.final.count == 2  # final_average leaves the rule's state unchanged


def test_swad_averages_segments_of_saved_weights():
    """30 steps in 15 segments of 2; segment i holds the weights 2i - 1, 2i (mean 2i - .5)
    and the loss LOSSES[i - 1]: the average is that of segments 5..9, 13.5."""
    swad = avg.SWAD(scalar(0.0), total_steps=30, segments=15, n_converge=3, n_tolerance=6,
                    tolerance_ratio=0.3)
    assert not swad.ready
    for step in range(1, 31):
        swad.update(scalar(step), LOSSES[(step - 1) // 2])
        if step == 2:
            assert swad.ready and swad.average[0].item() == 1.5  # the first segment's mean
    assert swad.valley.dead
    assert swad.average[0].item() == pytest.approx(13.5)


def make(name, **overrides):
    return get_method(name).create(["circle", "square"], {**TINY, **overrides}, total_steps=4)


BATCH = (torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
         torch.tensor([0, 1, 0, 1]))
TRAINED = sorted(name for name, cls in methods().items() if cls.trains)


def test_every_trained_method_declares_averaging():
    assert {"CLIPFT", "CLIPLP", "CLIPood", "AlignCLIP", "CALIPFS"} <= set(TRAINED)
    for name in TRAINED:
        declared = get_method(name).default_hparams()
        assert declared["averaging"] in avg.KINDS, name
        assert {"ema_decay", "bma_beta", "swad_segments"} <= set(declared), name
    assert get_method("CLIPood").default_hparams()["averaging"] == "bma"
    assert get_method("AlignCLIP").default_hparams()["averaging"] == "bma"
    assert get_method("CLIPFT").default_hparams()["averaging"] == "none"


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("kind", avg.KINDS)
def test_every_trained_method_runs_each_averaging(name, kind):
    torch.manual_seed(0)
    method = make(name, averaging=kind, swad_segments=2, lr=1e-2)
    method.train()
    for _ in range(4):
        method.update(*BATCH)
    method.eval()
    live = [p.detach().clone() for p in method.averaged_parameters()]
    with torch.no_grad():
        logits = method.predict(BATCH[0])
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    assert all(torch.equal(p, q) for p, q in zip(method.averaged_parameters(), live))
    keys = {k.split(".")[0] for k in method.state_dict()}
    assert (kind in keys) == (kind != "none"), keys
    if kind != "none":  # the average differs from the live weights after 4 steps
        average = method.averager.average
        assert any(not torch.equal(a, p) for a, p in zip(average, live)), name


def test_prediction_uses_the_average():
    """EMA with decay 0 is the last weights; with decay 1 - 1e-9 it stays at theta_0."""
    torch.manual_seed(0)
    plain = make("CLIPFT", lr=1e-2)
    torch.manual_seed(0)
    last = make("CLIPFT", lr=1e-2, averaging="ema", ema_decay=0.0)
    torch.manual_seed(0)
    start = make("CLIPFT", lr=1e-2, averaging="ema", ema_decay=1 - 1e-9)
    with torch.no_grad():
        before = plain.predict(BATCH[0])
    for method in (plain, last, start):
        method.update(*BATCH)
    with torch.no_grad():
        torch.testing.assert_close(last.predict(BATCH[0]), plain.predict(BATCH[0]))
        torch.testing.assert_close(start.predict(BATCH[0]), before)
        assert not torch.allclose(plain.predict(BATCH[0]), before)


def test_averaged_checkpoint_predicts_as_the_run():
    torch.manual_seed(0)
    method = make("CLIPFT", lr=1e-2, averaging="swad", swad_segments=2)
    for _ in range(4):
        method.update(*BATCH)
    torch.manual_seed(0)  # the same frozen tower (random tiny CLIP), untrained image tower
    fresh = make("CLIPFT", lr=1e-2, averaging="swad", swad_segments=2)
    assert "swad" not in dict(fresh.named_children())
    fresh.load_state_dict(method.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(BATCH[0]), method.predict(BATCH[0]))


def test_the_old_bma_switch_maps_to_averaging():
    assert make("CLIPood").averaging == "bma"
    assert make("CLIPood", bma=False).averaging == "none"
    assert make("CLIPood", averaging="swad").averaging == "swad"
    assert make("CLIPFT", bma=True).averaging == "bma"
    with pytest.raises(ValueError, match="bma true and averaging 'ema' disagree"):
        make("CLIPFT", bma=True, averaging="ema")
    with pytest.raises(ValueError, match="averaging 'mean' not in none, ema, swad, bma"):
        make("CLIPFT", averaging="mean")


@needs_domainbed
def test_domainbed_job_with_swad(small_world, tmp_path):
    out = tmp_path / "job"
    hparams = {**TINY, "batch_size": 8, "averaging": "swad", "swad_segments": 2}
    result = train_domainbed("CLIPFT", small_world, out, hparams,
                             "--test_envs", "1", "--steps", "4", "--checkpoint_freq", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = job_records(out)
    assert records[-1]["hparams"]["run"]["config"]["averaging"] == "swad"
    saved = torch.load(out / "model.pkl", weights_only=True)["model_dict"]
    assert {k.split(".")[1] for k in saved} == {"visual", "swad"}
    assert int(saved["method.swad.segments_seen"]) == 2


@needs_coop
def test_dassl_run_with_ema(small_world, tmp_path):
    result = train_coop("CLIPFT", small_world, tmp_path / "run", "DATASET.NUM_SHOTS", "2",
                        "DATASET.SUBSAMPLE_CLASSES", "base", "TRAINER.CLIPFT.AVERAGING", "ema",
                        "TRAINER.CLIPFT.EMA_DECAY", "0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["run"]["config"]["averaging"] == "ema"
    assert record["run"]["config"]["ema_decay"] == 0.5
    saved = torch.load(tmp_path / "run" / "model" / "model.pth.tar-1", weights_only=True)
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"visual", "ema"}
