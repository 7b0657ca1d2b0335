"""MaPLe (muzairkhattak/multimodal-prompt-learning) and PromptSRC run from their own code
through train_coop.py and sweeps/coop_protocols.py: one base-to-novel chain each on the
generated world, on small OpenAI-format CLIPs, into the same table as CoOp's; their
`trainers`, `datasets` and `clip` never shadow the harness's or each other's."""
import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import PY, REPO, THIRD_PARTY, needs_coop, run, upstream_missing
from trainers import coop_runner, upstream_patches

MAPLE_DIR, PROMPTSRC_DIR = THIRD_PARTY / "multimodal-prompt-learning", THIRD_PARTY / "PromptSRC"
MISSING = (upstream_missing("Dassl.pytorch", "dassl") or upstream_missing("CoOp", "dassl")
           or upstream_missing("multimodal-prompt-learning", "dassl")
           or upstream_missing("PromptSRC", "dassl"))
needs_upstreams = pytest.mark.skipif(bool(MISSING), reason=MISSING or "")
CONFIGS = REPO / "trainers" / "configs"


def openai_clip(folder: Path, **shape) -> Path:
    """A random CLIP built with CoOp's clip.model.CLIP, its fp16 state dict saved under the
    file name of OpenAI's ViT-B/16 download."""
    import torch
    spec = importlib.util.spec_from_file_location("coop_clip_model",
                                                  THIRD_PARTY / "CoOp" / "clip" / "model.py")
    model_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_py)
    torch.manual_seed(0)
    model = model_py.CLIP(context_length=77, vocab_size=49408, vision_layers=2,
                          transformer_layers=2, **shape)
    folder.mkdir()
    torch.save({k: v.half() for k, v in model.state_dict().items()}, folder / "ViT-B-16.pt")
    return folder


def protocol(*argv):
    return run([PY, "-m", "sweeps.coop_protocols", *map(str, argv)], timeout=600)


# --- without running upstream ---------------------------------------------------------

def test_each_trainer_runs_in_its_own_upstream():
    assert coop_runner.upstream_dir("MaPLe") == coop_runner.upstream_dir("IVLP") == MAPLE_DIR
    assert coop_runner.upstream_dir("PromptSRC") == PROMPTSRC_DIR
    for trainer in ("CoOp", "CoCoOp", "ZeroshotCLIP", "ZSCLIP", None):
        assert coop_runner.upstream_dir(trainer) == coop_runner.COOP_DIR
    assert coop_runner.trainer_argument(["--root", "d", "--trainer", "MaPLe", "X"]) == "MaPLe"
    assert coop_runner.trainer_argument(["--trainer=PromptSRC"]) == "PromptSRC"
    assert coop_runner.trainer_argument(["--root", "d"]) is None


def test_recipe_configs_are_upstreams_own():
    from sweeps import coop_protocols as cp
    maple, promptsrc = cp.load_settings("MaPLe"), cp.load_settings("PromptSRC")
    assert maple.config == MAPLE_DIR / "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"
    assert maple.source_config_for().name == "vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml"
    assert promptsrc.config.parent == PROMPTSRC_DIR / "configs" / "trainers" / "PromptSRC"
    assert promptsrc.source_config_for().name.endswith("_cross_datasets.yaml")
    assert maple.train and promptsrc.train
    if not MISSING:
        for path in (maple.config, maple.source_config, promptsrc.config, promptsrc.source_config):
            assert path.is_file(), path
    # a --config-file replaces the ImageNet model's config too
    assert cp.load_settings("MaPLe", CONFIGS / "MaPLe" / "tiny_vit.yaml").source_config_for() == \
        CONFIGS / "MaPLe" / "tiny_vit.yaml"


def test_upstream_patches_are_documented():
    readme = (THIRD_PARTY / "README.md").read_text()
    for upstream, table in upstream_patches.UPSTREAM_PATCHES.items():
        assert upstream in readme
        for module, changes in table.items():
            assert f"`{module}`" in readme, module
            for change in changes:
                assert change.__doc__ and change.__name__ in readme, change.__name__


@needs_coop
def test_a_missing_checkout_is_one_line(monkeypatch, tmp_path, capsys):
    from sweeps import coop_protocols as cp
    monkeypatch.setattr(cp, "upstream_dir", lambda trainer: tmp_path / "multimodal-prompt-learning")
    assert cp.main(["base2new", "--trainer", "MaPLe", "--root", str(tmp_path),
                    "--output", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"MaPLe: skipped, multimodal-prompt-learning not found at "
                   f"{tmp_path / 'multimodal-prompt-learning'} (run: python third_party/install.py)",
                   "coop_protocols: error: nothing can run (see the lines above)"]


# --- their own code -------------------------------------------------------------------

OPEN_ONE = """
import sys, torch
from trainers import coop_runner, upstream_patches
import trainers
coop_runner.prepare({trainer!r})
root = str(coop_runner.upstream_dir({trainer!r}).resolve())
import clip, clip.clip, datasets.oxford_pets, trainers.coop, trainers.{module}
for module in (clip, datasets.oxford_pets, trainers.coop, trainers.{module}):
    assert module.__file__.startswith(root), module.__file__
from trainers import dassl_adapter
assert dassl_adapter.__file__.startswith(trainers.__path__[0]), dassl_adapter.__file__
assert clip.clip._download.__wrapped__  # the local-weights patch reached this upstream's clip
for other in {others!r}:
    try:
        upstream_patches.open_upstream(other)
    except upstream_patches.UpstreamClash as e:
        assert "already open in this process" in str(e), e
    else:
        raise AssertionError(f"{{other}} opened beside {{root}}")
assert sum(p.endswith("/trainers") and "third_party" in p for p in trainers.__path__) == 1
patched = torch.Tensor.cuda is torch.nn.Module.cuda is upstream_patches._stay_where_it_is
print("cuda patched" if patched else "cuda")
"""


@needs_upstreams
def test_packages_never_shadow_each_other():
    """One upstream per process (MaPLe's here; PromptSRC's runs in the chain test below):
    its `clip`, `datasets`, `trainers.<x>` (its own copy of CoOp's coop.py included); the
    harness's `trainers` modules stay the harness's; opening CoOp or PromptSRC in the same
    process is refused; PromptSRC's patch row is not applied."""
    others = [str(coop_runner.COOP_DIR), str(PROMPTSRC_DIR)]
    result = run([PY, "-c", OPEN_ONE.format(trainer="MaPLe", module="maple", others=others)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("cuda"), result.stdout[-500:]


@needs_upstreams
def test_maple_and_promptsrc_base2new_chains_in_the_collected_table(small_world, tmp_path):
    # MaPLe's prompt learner assumes ViT-B/16's widths (512 text, 768 vision): 32 px, patch
    # 16; PromptSRC takes any width: CoOp's tests' tiny shape
    maple_clip = openai_clip(tmp_path / "maple_clip", embed_dim=512, image_resolution=32,
                             vision_width=768, vision_patch_size=16, transformer_width=512,
                             transformer_heads=8)
    promptsrc_clip = openai_clip(tmp_path / "promptsrc_clip", embed_dim=64, image_resolution=64,
                                 vision_width=64, vision_patch_size=8, transformer_width=64,
                                 transformer_heads=1)
    out = tmp_path / "output"
    for trainer, weights in (("MaPLe", maple_clip), ("PromptSRC", promptsrc_clip)):
        result = protocol("base2new", "--trainer", trainer, "--config-file",
                          CONFIGS / trainer / "tiny_vit.yaml", "--root", small_world["coop_root"],
                          "--output", out, "--datasets", "clip_world", "--seeds", "1",
                          "--shots", "1", "--openai-clip-dir", weights, "--no-figures")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "2 runs: 0 finished (skipped), 2 to run" in result.stdout
    found = {p.relative_to(out / "base2new").parts: json.loads(p.read_text())
             for p in (out / "base2new").rglob("results.json")}
    assert set(found) == {(stage, "clip_world", "shots_1", t, "tiny_vit", "seed1", "results.json")
                          for stage in ("train_base", "test_new") for t in ("MaPLe", "PromptSRC")}
    for key, record in found.items():
        assert record["trainer"] == key[3] and record["kind"] == "dassl"
        assert (record["run"]["protocol"], record["run"]["stage"]) == \
            ("base2new", {"train_base": "base", "test_new": "new"}[key[0]])
        assert record["subsample_classes"] == {"train_base": "base", "test_new": "new"}[key[0]]
    # each new-class test loaded its base model's last epoch, with upstream's own loader
    for trainer, learner in (("MaPLe", "MultiModalPromptLearner"), ("PromptSRC", "VLPromptLearner")):
        base = out / "base2new" / "train_base" / "clip_world" / "shots_1" / trainer / "tiny_vit" / "seed1"
        assert (base / learner / "model.pth.tar-1").is_file()
        log = Path(str(base).replace("train_base", "test_new")) / "log.txt"
        assert f"Loading weights to {learner}" in log.read_text()
    assert "Using GPA model for final inference" in (
        out / "base2new" / "train_base" / "clip_world" / "shots_1" / "PromptSRC" / "tiny_vit"
        / "seed1" / "log.txt").read_text()
    # both in one table (the second run's collector reads both), with the harmonic mean,
    # beside their published rows
    table = (out / "tables" / "base2new" / "dassl_base2new_CLIPWorld.md").read_text()
    for trainer in ("MaPLe", "PromptSRC"):
        base = found["train_base", "clip_world", "shots_1", trainer, "tiny_vit", "seed1",
                     "results.json"]["metrics"]["accuracy"]
        new = found["test_new", "clip_world", "shots_1", trainer, "tiny_vit", "seed1",
                    "results.json"]["metrics"]["accuracy"]
        hm = 2 * base * new / (base + new) if base + new else 0.0
        row = f"| {base:.2f} ± 0.00 | {new:.2f} ± 0.00 | {hm:.2f} |"
        assert any(line.startswith(f"| {trainer}") and line.endswith(row)
                   for line in table.splitlines()), table
    average = (out / "tables" / "base2new" / "dassl_base2new_average.md").read_text()
    for trainer in ("MaPLe", "PromptSRC"):
        assert f"| {trainer} (1 datasets) |" in average, average
        assert f"| *{trainer} (published, ViT-B/16)* |" in average, average
