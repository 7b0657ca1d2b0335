"""Tests for the tiny CLIP's pretraining (pretraining/tiny_clip.py): open_clip_train runs on a
very small world, the checkpoint loads with load_clip, the cache key and reuse."""
import csv
import os
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from algorithms import backbone
from clipworld import generate as world
from pretraining import tiny_clip as pretrain

CONFIG = pretrain.PretrainConfig(epochs=2, batch_size=32, lr=1e-3, warmup=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    paths = world.generate_world(root / "world", seed=0, per_class_domain=4,
                                 compositional_per_class=1, pretrain_per_class_domain=4)
    ckpt = pretrain.pretrain(root / "world", root / "cache", CONFIG, progress=False)
    return {"root": root, "paths": paths, "ckpt": ckpt}


def _no_training(*args, **kwargs):
    raise AssertionError("open_clip_train was run again")


def _clip_loss(model, tokenizer, csv_path) -> float:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    transform = backbone.clip_transform(backbone.image_size_of("tiny-vit"), False)
    from PIL import Image
    images = torch.stack([transform(Image.open(r["filepath"])) for r in rows])
    texts = tokenizer([r["title"] for r in rows])
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(texts), dim=-1)
        return open_clip.ClipLoss()(image_features, text_features,
                                    model.logit_scale.exp()).item()


def test_pretraining_lowers_the_contrastive_loss(trained):
    torch.manual_seed(CONFIG.seed)
    untrained, tokenizer = backbone.load_clip("tiny-vit", None)
    model, _ = backbone.load_clip("tiny-vit", str(trained["ckpt"]))
    train_csv = trained["paths"]["pairs_train_csv"]
    before, after = _clip_loss(untrained, tokenizer, train_csv), _clip_loss(model, tokenizer, train_csv)
    assert after < before - 0.1, (before, after)


def test_checkpoint_is_a_bare_state_dict_that_load_clip_loads(trained):
    ckpt = trained["ckpt"]
    assert ckpt.name == pretrain.CHECKPOINT_NAME and ckpt.parent.parent == trained["root"] / "cache"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert "logit_scale" in state and not any(k.startswith("module.") for k in state)
    model, _ = backbone.load_clip("tiny-vit", str(ckpt))
    assert torch.equal(model.state_dict()["visual.proj"], state["visual.proj"])
    assert not list(ckpt.parent.glob("logs/train/checkpoints"))  # optimizer state dropped


def test_report_beside_the_checkpoint(trained):
    report = pretrain.read_report(trained["ckpt"])
    assert report["config"] == {**CONFIG.__dict__}
    assert report["world"]["per_class_domain"] == 4
    zero_shot = report["zero_shot"]
    assert zero_shot["seen_heldout"]["n"] == 3 * 4 * len(world.CLASSES)  # DomainBed images
    assert zero_shot["painting"]["n"] == 4 * len(world.CLASSES)
    assert set(zero_shot["by_domain"]) <= set(world.DOMAINS) and "painting" in zero_shot["by_domain"]
    for part in ("seen_heldout", "painting"):
        assert 0.0 <= zero_shot[part]["accuracy"] <= 1.0
    assert report["train_seconds"] > 0 and report["final_val_clip_loss"] > 0
    assert (trained["ckpt"].parent / report["open_clip_train_log"]).is_file()
    assert "painting" in pretrain.format_report(report)
    from common.run_facts import check_facts
    facts = check_facts(report["run"], "tiny-clip.json")
    assert (facts["protocol"], facts["stage"], facts["method"]) == ("pretraining", "train", "CLIP")
    assert (facts["backbone"], facts["precision"], facts["seeds"]) == ("tiny-vit", "fp32", {"seed": 0})
    assert facts["weights_digest"] is None  # from scratch: no starting weights file
    assert facts["dataset"] == Path(trained["paths"]["pairs_train_csv"]).name
    assert facts["config"]["epochs"] == CONFIG.epochs and facts["config"]["text_tower_from"] is None


def test_cache_key_is_stable_and_follows_config_and_world(trained):
    opts = pretrain.world_options(trained["root"] / "world")
    key = pretrain.cache_key(CONFIG, opts)
    assert key == pretrain.cache_key(pretrain.PretrainConfig(**CONFIG.__dict__), dict(opts))
    assert trained["ckpt"].parent.name == key
    assert pretrain.cache_key(pretrain.PretrainConfig(**{**CONFIG.__dict__, "seed": 1}), opts) != key
    assert pretrain.cache_key(pretrain.PretrainConfig(**{**CONFIG.__dict__, "epochs": 3}), opts) != key
    assert pretrain.cache_key(CONFIG, {**opts, "seed": 1}) != key


def test_second_call_reuses_the_checkpoint(trained, monkeypatch):
    monkeypatch.setattr(pretrain, "run_open_clip_train", _no_training)
    mtime = trained["ckpt"].stat().st_mtime_ns
    start = time.time()
    again = pretrain.pretrain(trained["root"] / "world", trained["root"] / "cache", CONFIG)
    assert again == trained["ckpt"] and again.stat().st_mtime_ns == mtime
    assert time.time() - start < 5


def test_cli_prints_the_checkpoint(trained, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "run_open_clip_train", _no_training)
    argv = ["--world", str(trained["root"] / "world"), "--cache-dir", str(trained["root"] / "cache")]
    for name, value in CONFIG.__dict__.items():
        if name != "text_tower_from":
            argv += [f"--{name.replace('_', '-')}", str(value)]
    argv.append("--from-scratch")
    assert pretrain.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(trained["ckpt"]) and "zero-shot" in lines[-2]


def test_a_failed_run_leaves_nothing_that_counts_as_finished(trained, monkeypatch):
    def crash(args):
        logs = Path(args[args.index("--logs") + 1])
        (logs / "train" / "checkpoints").mkdir(parents=True)
        (logs / "train" / "checkpoints" / "epoch_1.pt").write_bytes(b"half")
        raise RuntimeError("killed")
    monkeypatch.setattr(pretrain, "run_open_clip_train", crash)
    cache = trained["root"] / "cache"
    config = pretrain.PretrainConfig(**{**CONFIG.__dict__, "epochs": 1})
    before = set(os.listdir(cache))
    with pytest.raises(RuntimeError, match="killed"):
        pretrain.pretrain(trained["root"] / "world", cache, config)
    assert set(os.listdir(cache)) == before
    key = pretrain.cache_key(config, pretrain.world_options(trained["root"] / "world"))
    assert pretrain.cached_checkpoint(cache, key) is None


def test_missing_world_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m clipworld.generate"):
        pretrain.pretrain(tmp_path / "nothing", tmp_path / "cache", CONFIG)



def test_second_stage_learns_the_image_tower_on_the_locked_text_tower(trained):
    """Default recipe, shortened: tiny-rn from scratch, then tiny-vit from its text
    tower (open_clip_train --pretrained --lock-text)."""
    stage1 = pretrain.PretrainConfig(**{**CONFIG.__dict__, "model": "tiny-rn", "epochs": 1})
    stage2 = pretrain.PretrainConfig(**{**CONFIG.__dict__, "epochs": 1, "text_tower_from": stage1})
    cache = trained["root"] / "cache2"
    ckpt = pretrain.pretrain(trained["root"] / "world", cache, stage2, progress=False)
    opts = pretrain.world_options(trained["root"] / "world")
    text_ckpt = pretrain.cached_checkpoint(cache, pretrain.cache_key(stage1, opts))
    assert text_ckpt is not None and ckpt.parent != text_ckpt.parent
    report = pretrain.read_report(ckpt)
    assert report["text_tower_from"] == str(text_ckpt)
    assert report["run"]["config"]["text_tower_from"] == "tiny-rn"
    assert report["run"]["weights_digest"].startswith("sha256:")  # its init.pt
    vit = torch.load(ckpt, weights_only=True)
    rn = torch.load(text_ckpt, weights_only=True)
    text_keys = [k for k in vit if not k.startswith("visual.") and k != "logit_scale"]
    assert "token_embedding.weight" in text_keys and "text_projection" in text_keys
    assert [k for k in text_keys if not torch.equal(vit[k], rn[k])] == []  # locked
    torch.manual_seed(CONFIG.seed)
    fresh, _ = backbone.load_clip("tiny-vit", None)
    assert not torch.equal(fresh.state_dict()["visual.proj"], vit["visual.proj"])  # trained
    assert not list(ckpt.parent.glob("init.pt"))


def test_text_tower_init_refuses_a_mismatched_checkpoint(tmp_path):
    torch.save({"token_embedding.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no text-tower weight"):
        pretrain.text_tower_init("tiny-vit", tmp_path / "bad.pt", 0, tmp_path / "init.pt")
    assert not (tmp_path / "init.pt").exists()


def test_open_clip_train_failure_names_its_output(tmp_path):
    args = pretrain.open_clip_train_args(
        CONFIG, {"pairs_train_csv": str(tmp_path / "missing.csv"),
                 "pairs_val_csv": str(tmp_path / "missing.csv")}, tmp_path / "logs")
    with pytest.raises(RuntimeError, match=r"open_clip_train failed \(exit \d+\); its output: "):
        pretrain.run_open_clip_train(args)
    assert (tmp_path / "logs" / "train.stdout").read_text().strip()
