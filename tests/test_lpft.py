"""LPFT: the step split, the staged optimiser on a hand-computed example, the LP stage as
CLIPLP, the FT stage starting from the LP stage's head, a DomainBed job and a Dassl run
on the generated world."""
import json

import pytest
import torch
import torch.nn.functional as F

from algorithms.core.registry import get_method
from algorithms.lpft import StagedTrainingState, lp_steps
from tests.conftest import (TINY, job_records, needs_coop, needs_domainbed, train_coop,
                            train_domainbed)

CLASSES = ["circle", "square", "star"]
BATCH = (torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
         torch.tensor([0, 1, 2, 0, 1, 2]))


def make(name, total_steps, **overrides):
    torch.manual_seed(0)
    return get_method(name).create(CLASSES, {**TINY, **overrides}, total_steps=total_steps)


def test_step_split():
    assert lp_steps(0.5, 7) == 3 and lp_steps(0.29, 100) == 29
    assert lp_steps(0.0, 7) == 0 and lp_steps(1.0, 7) == 7
    with pytest.raises(ValueError, match="lp_fraction 1.5 not in"):
        lp_steps(1.5, 7)


def test_staged_training_state_by_hand():
    """Loss a + b: stage 0 (SGD lr 0.1 on a) for 2 steps, then stage 1 (SGD lr 0.5 on b)."""
    a, b = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(1.0))
    first, second = torch.optim.SGD([a], lr=0.1), torch.optim.SGD([b], lr=0.5)
    constant = torch.optim.lr_scheduler.LambdaLR
    state = StagedTrainingState([(first, constant(first, lambda s: 1.0)),
                                 (second, constant(second, lambda s: 1.0))], [2, 3])
    stages = []
    for _ in range(3):
        stages.append(state.stage)
        state.optimizer.zero_grad()
        (a + b).backward()
        state.optimizer.step()
        state.scheduler.step()
    assert stages == [0, 0, 1]
    assert a.item() == pytest.approx(0.8) and b.item() == pytest.approx(0.5)
    assert state.param_groups is second.param_groups
    saved = state.state_dict()
    fresh = StagedTrainingState([(o, constant(o, lambda s: 1.0)) for o in (
        torch.optim.SGD([a], lr=0.1), torch.optim.SGD([b], lr=0.5))], [2, 3])
    assert fresh.stage == 0
    fresh.load_state_dict(saved)
    assert fresh.stage == 1  # the stage travels with the schedules


def test_lp_stage_is_cliplp_and_leaves_the_encoder_alone():
    lpft = make("LPFT", 8, lp_init="zeroshot", lp_fraction=0.5)
    probe = make("CLIPLP", 4, lp_init="zeroshot", lr=lpft.cfg.lp_lr,
                 weight_decay=lpft.cfg.lp_weight_decay)
    encoder = {k: v.clone() for k, v in lpft.visual.state_dict().items()}
    lpft.train(), probe.train()
    for _ in range(4):
        assert lpft.update(*BATCH)["lp_stage"] == 1.0
        probe.update(*BATCH)
    assert torch.equal(lpft.head.weight, probe.head.weight)
    assert torch.equal(lpft.head.bias, probe.head.bias)
    assert all(torch.equal(v, encoder[k]) for k, v in lpft.visual.state_dict().items())
    assert all(p.grad is None for p in lpft.visual.parameters())


def test_second_stage_starts_from_the_first_stages_head():
    method = make("LPFT", 4, lp_init="random", lp_fraction=0.5, lp_lr=0.05, lr=1e-2)
    initial_head = method.head.weight.clone()
    method.train()
    stages = [method.update(*BATCH)["lp_stage"] for _ in range(2)]
    after_lp = (method.head.weight.clone(), method.head.bias.clone())
    assert not torch.equal(after_lp[0], initial_head)  # the probe trained
    seen = []
    hook = method.head.register_forward_pre_hook(
        lambda module, args: seen.append((module.weight.clone(), module.bias.clone())))
    images, labels = BATCH
    with torch.no_grad():  # the FT stage's first loss, by hand from the LP stage's head
        features = F.normalize(method.visual(images), dim=-1)
        expected = F.cross_entropy(features @ after_lp[0].T + after_lp[1], labels)
    encoder = {k: v.clone() for k, v in method.visual.state_dict().items()}
    summary = method.update(images, labels)
    hook.remove()
    stages.append(summary["lp_stage"])
    assert stages == [1.0, 1.0, 0.0] and summary["lp_steps"] == 2.0
    assert torch.equal(seen[0][0], after_lp[0]) and torch.equal(seen[0][1], after_lp[1])
    assert summary["loss"] == pytest.approx(expected.item(), rel=1e-6)
    full = method.training_state.optimizer
    assert isinstance(full, torch.optim.SGD) and full.param_groups[0]["momentum"] == 0.9
    assert any(p is method.head.weight for p in full.param_groups[0]["params"])
    assert not all(torch.equal(v, encoder[k]) for k, v in method.visual.state_dict().items())
    assert not method.visual.training  # eval mode, as the reference's use_net_val_mode
    assert sorted({k.split(".")[0] for k in method.state_dict()}) == ["head", "visual"]


def test_fractions_zero_and_one_are_fine_tuning_and_probing():
    tuned = make("LPFT", 2, lp_fraction=0.0)
    probed = make("LPFT", 2, lp_fraction=1.0)
    tuned.train(), probed.train()
    assert [tuned.update(*BATCH)["lp_stage"] for _ in range(2)] == [0.0, 0.0]
    assert [probed.update(*BATCH)["lp_stage"] for _ in range(2)] == [1.0, 1.0]


@needs_domainbed
def test_domainbed_job_records_the_split(small_world, tmp_path):
    out = tmp_path / "job"
    hparams = {**TINY, "batch_size": 8, "lp_fraction": 0.5, "lp_init": "zeroshot"}
    result = train_domainbed("LPFT", small_world, out, hparams,
                             "--test_envs", "1", "--steps", "4", "--checkpoint_freq", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = job_records(out)
    assert [r["step"] for r in records] == [0, 2, 3]
    assert [r["lp_stage"] for r in records] == [1.0, 0.5, 0.0]  # means over each interval
    assert records[-1]["lp_steps"] == 2.0 and records[-1]["hparams"]["total_steps"] == 4
    assert records[-1]["hparams"]["run"]["config"]["lp_fraction"] == 0.5
    saved = torch.load(out / "model.pkl", weights_only=True)["model_dict"]
    assert {k.split(".")[1] for k in saved} == {"visual", "head"}


@needs_coop
def test_dassl_run_trains_and_saves_both_stages(small_world, tmp_path):
    result = train_coop("LPFT", small_world, tmp_path / "run", "DATASET.NUM_SHOTS", "2",
                        "DATASET.SUBSAMPLE_CLASSES", "base", "TRAINER.LPFT.LP_INIT", "zeroshot")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["trainer"] == "LPFT" and 0.0 <= record["metrics"]["accuracy"] <= 100.0
    assert record["run"]["config"]["lp_fraction"] == 0.5
    saved = torch.load(tmp_path / "run" / "model" / "model.pth.tar-1", weights_only=True)
    assert len(saved["optimizer"]["stages"]) == 2
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"visual", "head"}
