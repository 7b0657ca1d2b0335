"""The CoOp protocol runner (sweeps/coop_protocols.py) killed mid-epoch, on the generated
world: rerunning it keeps the finished runs as they are and redoes the killed one from
scratch; the half-trained run never counts as finished."""
import json

from tests import faults
from tests.conftest import PY, REPO, needs_coop, run

pytestmark = [needs_coop, faults.needs_proc]

BACKBONE = str(REPO / "trainers" / "configs" / "backbones" / "tiny_vit.yaml")
ENV = {"CLIPBENCH_CACHE": "off"}


def protocol(world, out):
    return [PY, "-m", "sweeps.coop_protocols", "base2new", "--trainer", "ZSCLIP", "CLIPFT",
            "--datasets", "clip_world", "--root", world["coop_root"], "--output", str(out),
            "--seeds", "1", "--shots", "8", "--config-file", BACKBONE, "--no-figures",
            "--opts", "OPTIM.MAX_EPOCH", "3", "TRAIN.CHECKPOINT_FREQ", "1"]


def runs(out) -> dict:
    common = ("clip_world", "shots_8")
    return {(trainer, stage): out / "base2new" / stage / common[0] / common[1] / trainer /
            "tiny_vit" / "seed1"
            for trainer in ("ZSCLIP", "CLIPFT") for stage in ("train_base", "test_new")}


def test_a_run_killed_mid_epoch_is_redone_and_finished_ones_kept(small_world, tmp_path):
    out = tmp_path / "out"
    folders = runs(out)
    training = folders["CLIPFT", "train_base"]
    runner = faults.start(protocol(small_world, out), env=ENV, log=tmp_path / "first.log")
    try:  # killed (runner and run) once the first epoch's checkpoint is saved
        faults.wait_for(lambda: (training / "model" / "model.pth.tar-1").exists(),
                        "the first epoch of CLIPFT", proc=runner, interval=0.02)
    finally:
        faults.kill_group(runner)
    assert not (training / "results.json").exists()
    assert not (training / "model" / "model.pth.tar-3").exists(), "killed too late"
    assert not folders["CLIPFT", "test_new"].exists()
    kept = {k: (f / "results.json").read_bytes() for k, f in folders.items()
            if k[0] == "ZSCLIP"}
    mtimes = {k: (folders[k] / "results.json").stat().st_mtime_ns for k in kept}

    again = run(protocol(small_world, out), env=ENV, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "4 runs: 2 finished (skipped), 2 to run" in again.stdout
    assert f"removing an unfinished run at {training}" in again.stdout
    for k, before in kept.items():  # finished runs are not run again
        assert (folders[k] / "results.json").read_bytes() == before
        assert (folders[k] / "results.json").stat().st_mtime_ns == mtimes[k]
    for k, folder in folders.items():
        record = json.loads((folder / "results.json").read_text())
        assert record["trainer"] == k[0] and 0 <= record["metrics"]["accuracy"] <= 100
    epochs = sorted(p.name for p in (training / "model").glob("model.pth.tar-*"))
    assert epochs == ["model.pth.tar-1", "model.pth.tar-2", "model.pth.tar-3"]
    log = (training / "log.txt").read_text()
    assert "No checkpoint found, train from scratch" in log and "will resume" not in log


def test_dassl_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """train_coop.py's Dassl checkpoints (trainers/upstream_patches.py _atomic_checkpoints): a
    save that dies inside torch.save leaves the previous checkpoint, and the `checkpoint`
    file Dassl resumes from still names it; no half file takes a checkpoint's name."""
    import torch
    from dassl.engine import trainer as dassl_trainer

    from trainers import upstream_patches
    upstream_patches._atomic_checkpoints(dassl_trainer)
    from dassl.utils import torchtools
    save = dassl_trainer.save_checkpoint
    assert torchtools.save_checkpoint is save
    save({"state_dict": {"module.w": torch.zeros(2)}, "epoch": 1}, str(tmp_path), is_best=True)
    assert (tmp_path / "checkpoint").read_text() == "model.pth.tar-1\n"

    def dies(obj, f, *args, **kwargs):
        open(f, "wb").write(b"PK\x03\x04 half")  # what a killed torch.save leaves
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", dies)
    try:
        save({"state_dict": {"w": torch.ones(2)}, "epoch": 2}, str(tmp_path))
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "model-best.pth.tar",
                                                          "model.pth.tar-1"]
    assert (tmp_path / "checkpoint").read_text() == "model.pth.tar-1\n"
    state = torch.load(tmp_path / "model.pth.tar-1", weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["state_dict"]["w"], torch.zeros(2))
