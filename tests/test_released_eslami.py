"""Eslami & de Melo's released checkpoints (algorithms/backbone/released.py,
pretraining/released.py): a checkpoint written here in their layouts, from a small
re-implementation of their forward pass (sarahESL/AlignCLIP `align_clip/model.py`,
`transformer.py`: written from its description, tiny widths, random weights), imports
into the harness's models with the same image and text features; damaged files are
refused in one line naming the key; `hf-hub:` names resolve from the cache only."""
import logging
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from algorithms import backbone
from algorithms.backbone import CheckpointError
from algorithms.backbone import released as layouts
from pretraining import evaluate, released, sharedclip

logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning

REPO_ROOT = Path(__file__).resolve().parents[1]
# tiny-sharedclip's numbers: width 64, 2 layers, 2 heads, 64 px, patch 8, context 32, embed 64
WIDTH, LAYERS, HEADS, IMAGE, PATCH, CONTEXT, EMBED, VOCAB = 64, 2, 2, 64, 8, 32, 64, 49408


# --- their forward, re-implemented (not imported: the reference code is no dependency) -------

class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)); x + mlp(ln_2(x)); GELU (no quick_gelu in
    their configs). Sequence-first input, as theirs."""

    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(WIDTH, 4 * WIDTH)),
                                              ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * WIDTH, WIDTH))]))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.resblocks = nn.ModuleList([Block() for _ in range(LAYERS)])

    def forward(self, x, mask=None):  # x: [N, L, D]
        x = x.permute(1, 0, 2)
        for block in self.resblocks:
            x = block(x, mask)
        return x.permute(1, 0, 2)


class PatchEmbed(nn.Module):
    """Their VisionEncoder: patches + class token + positions, then ln_pre."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn((IMAGE // PATCH) ** 2 + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)

    def forward(self, images):
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, WIDTH)
        return self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)


class TokenEmbed(nn.Module):
    """Their TextEncoder: token + position embeddings; text_projection kept, never used."""

    def __init__(self):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, WIDTH))
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED))

    def forward(self, text):
        return self.token_embedding(text) + self.positional_embedding[:text.shape[1]]


def causal_mask():
    return torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)


class TheirSharedCLIP(nn.Module):
    """One transformer, ln_post, projection for both: image -> CLS token, text -> the
    highest token id's position (EOT); ln_post applied for both."""

    def __init__(self):
        super().__init__()
        self.transformer = Transformer()
        self.visual = PatchEmbed()
        self.text = TokenEmbed()
        self.ln_post = nn.LayerNorm(WIDTH)
        self.projection = nn.Parameter(torch.randn(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image(self, images):
        return self.ln_post(self.transformer(self.visual(images))[:, 0]) @ self.projection

    def encode_text(self, text):
        x = self.ln_post(self.transformer(self.text(text), causal_mask()))
        return x[torch.arange(len(text)), text.argmax(dim=-1)] @ self.projection


class TheirUntiedCLIP(nn.Module):
    """The untied layout (open_clip CustomTextCLIP keys): each tower its own transformer,
    final LayerNorm and projection."""

    def __init__(self):
        super().__init__()
        self.visual = PatchEmbed()
        self.visual.transformer, self.visual.ln_post = Transformer(), nn.LayerNorm(WIDTH)
        self.visual.proj = nn.Parameter(torch.randn(WIDTH, EMBED))
        self.text = TokenEmbed()
        self.text.transformer, self.text.ln_final = Transformer(), nn.LayerNorm(WIDTH)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image(self, images):
        v = self.visual
        return v.ln_post(v.transformer(v(images))[:, 0]) @ v.proj

    def encode_text(self, text):
        t = self.text
        x = t.ln_final(t.transformer(t(text), causal_mask()))
        return x[torch.arange(len(text)), text.argmax(dim=-1)] @ t.text_projection


def randomised(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms too, so a mixed-up norm shows
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and
                                                               p.shape[0] == WIDTH else 0.0))
    return model.eval()


def save_as_released(model, path, prefix="module.", wrapped=True):
    """As their main/run.py saves it (DDP: `module.` keys), optimizer state included."""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if wrapped:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.logit_scale.grad = torch.zeros(())
        optimizer.step()
        state = {"epoch": 30, "name": "2024_01_01-model_ViT-B-16-lr_0.001", "state_dict": state,
                 "optimizer": optimizer.state_dict(),
                 "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 0}}
    torch.save(state, path)
    return Path(path)


def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    texts = open_clip.get_tokenizer("tiny-sharedclip")(["a red circle", "a blue square", "x"])
    return images, texts


def assert_same_features(model, reference):
    images, texts = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(texts), reference.encode_text(texts),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.logit_scale, reference.logit_scale)


@pytest.fixture(scope="module")
def theirs_shared():
    torch.manual_seed(0)
    return randomised(TheirSharedCLIP(), seed=2)


@pytest.fixture(scope="module")
def theirs_untied():
    torch.manual_seed(0)
    return randomised(TheirUntiedCLIP(), seed=3)


@pytest.fixture(scope="module")
def shared_file(theirs_shared, tmp_path_factory):
    return save_as_released(theirs_shared, tmp_path_factory.mktemp("released") / "epoch_30.pt")


@pytest.fixture(scope="module")
def untied_file(theirs_untied, tmp_path_factory):
    return save_as_released(theirs_untied, tmp_path_factory.mktemp("released") / "epoch_30.pt")


def one_line_error(call, *args, error=CheckpointError, **kwargs):
    with pytest.raises(error) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --- the tied layout ----------------------------------------------------------------------

def test_reference_is_written_in_their_layout(shared_file):
    content = torch.load(shared_file, weights_only=True)
    assert set(content) == {"epoch", "name", "state_dict", "optimizer", "scaler"}
    keys = set(content["state_dict"])
    assert {"module.projection", "module.ln_post.weight", "module.logit_scale",
            "module.visual.conv1.weight", "module.visual.ln_pre.bias",
            "module.text.token_embedding.weight", "module.text.text_projection",
            "module.transformer.resblocks.1.attn.in_proj_weight"} <= keys
    assert not any(k.startswith(("module.text.transformer", "module.visual.transformer"))
                   for k in keys)
    assert layouts.released_layout(shared_file) == layouts.SHARED


def test_shared_layout_imports_into_the_tied_sharedclip_with_their_features(shared_file, theirs_shared):
    model = sharedclip.create_model_and_transforms("tiny-sharedclip", pretrained=str(shared_file))[0]
    assert sharedclip.is_tied(model)
    assert_same_features(model.eval(), theirs_shared)


def test_shared_layout_loads_for_the_methods_untied_with_the_same_features(shared_file, theirs_shared):
    for name in ("tiny-sharedclip", "tiny-clip-w64"):  # clip_pretrained=<their file>
        model, _ = backbone.load_clip(name, str(shared_file))
        assert not sharedclip.is_tied(model)
        assert_same_features(model, theirs_shared)


def test_bare_and_unprefixed_state_dicts_load_too(tmp_path, theirs_shared):
    path = save_as_released(theirs_shared, tmp_path / "bare.pt", prefix="", wrapped=False)
    model = sharedclip.create_model_and_transforms("tiny-sharedclip", pretrained=str(path))[0]
    assert_same_features(model.eval(), theirs_shared)


def test_evaluate_load_model_takes_their_file(shared_file, theirs_shared):
    model, _, _, tied = evaluate.load_model("tiny-sharedclip", str(shared_file))
    assert tied
    assert_same_features(model, theirs_shared)


def test_importer_picks_the_fitting_config_and_maps_their_names(shared_file, untied_file):
    assert released.import_released(shared_file)[3] == "tiny-sharedclip"
    assert released.import_released(untied_file)[3] == "tiny-clip-w64"
    assert layouts.harness_model_name("ViT-L-16", layouts.SHARED) == "SharedCLIP-ViT-L-16"
    assert layouts.harness_model_name("ViT-B-16", layouts.UNTIED) == "CLIP-ViT-B-16-w768"
    sharedclip.register_model_configs()
    for their_name, (tied, untied) in layouts.THEIR_MODEL_NAMES.items():
        assert sharedclip.is_shared(tied) and not sharedclip.is_shared(untied)
        assert open_clip.get_model_config(tied) == open_clip.get_model_config(untied)
    large = open_clip.get_model_config("SharedCLIP-ViT-L-16")
    assert (large["embed_dim"], large["vision_cfg"]["layers"], large["text_cfg"]["layers"],
            large["text_cfg"]["width"]) == (768, 16, 16, 768)


def their_layout_shapes(layers, width, embed):
    """Their tied state dict's keys and shapes for one of their configs (meta tensors: the
    shapes without the memory), as align_clip/model.py names them."""
    def t(*shape):
        return torch.empty(shape, device="meta")
    state = {"projection": t(width, embed), "logit_scale": t(), "ln_post.weight": t(width),
             "ln_post.bias": t(width), "visual.conv1.weight": t(width, 3, 16, 16),
             "visual.class_embedding": t(width), "visual.positional_embedding": t(197, width),
             "visual.ln_pre.weight": t(width), "visual.ln_pre.bias": t(width),
             "text.token_embedding.weight": t(49408, width),
             "text.positional_embedding": t(77, width), "text.text_projection": t(width, embed)}
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        state.update({block + "attn.in_proj_weight": t(3 * width, width),
                      block + "attn.in_proj_bias": t(3 * width),
                      block + "attn.out_proj.weight": t(width, width),
                      block + "attn.out_proj.bias": t(width),
                      block + "mlp.c_fc.weight": t(4 * width, width),
                      block + "mlp.c_fc.bias": t(4 * width),
                      block + "mlp.c_proj.weight": t(width, 4 * width),
                      block + "mlp.c_proj.bias": t(width)})
        for norm in ("ln_1", "ln_2"):
            state.update({block + norm + ".weight": t(width), block + norm + ".bias": t(width)})
    return state


@pytest.mark.parametrize("their_name, numbers", [("ViT-B-16", (12, 768, 768)),
                                                 ("ViT-B-16-512", (12, 768, 512)),
                                                 ("ViT-L-16", (16, 768, 768))])
def test_their_full_size_configs_have_one_harness_config_each(their_name, numbers):
    state = their_layout_shapes(*numbers)
    assert layouts.layout_of(state) == layouts.SHARED
    assert layouts.fitting_configs(state, layouts.SHARED) == [
        layouts.harness_model_name(their_name, layouts.SHARED)]


# --- the untied layout --------------------------------------------------------------------

def test_untied_layout_imports_into_a_plain_clip_with_their_features(untied_file, theirs_untied):
    assert layouts.released_layout(untied_file) == layouts.UNTIED
    model, _ = backbone.load_clip("tiny-clip-w64", str(untied_file))
    assert_same_features(model, theirs_untied)
    model = sharedclip.create_model_and_transforms("tiny-clip-w64", pretrained=str(untied_file))[0]
    assert_same_features(model.eval(), theirs_untied)


def test_untied_file_is_refused_by_a_tied_config(untied_file):
    message = one_line_error(sharedclip.create_model_and_transforms, "tiny-sharedclip",
                             pretrained=str(untied_file))
    assert "untied" in message and "tiny-clip-w64" in message


# --- damaged files ------------------------------------------------------------------------

def damaged(shared_file, tmp_path, change):
    content = torch.load(shared_file, weights_only=True)
    change(content["state_dict"])
    path = tmp_path / "damaged.pt"
    torch.save(content, path)
    return str(path)


@pytest.mark.parametrize("change, named", [
    (lambda s: s.pop("module.transformer.resblocks.1.mlp.c_fc.bias"),
     "missing module.transformer.resblocks.1.mlp.c_fc.bias"),
    (lambda s: s.pop("module.ln_post.weight"), "missing module.ln_post.weight"),
    (lambda s: s.__setitem__("module.visual.positional_embedding", torch.zeros(50, WIDTH)),
     "module.visual.positional_embedding has shape [50, 64]"),
    (lambda s: s.__setitem__("module.text.text_projection", torch.zeros(WIDTH, 3)),
     "module.text.text_projection has shape [64, 3]"),
    (lambda s: s.__setitem__("module.visual.head.weight", torch.zeros(3)),
     "unexpected key module.visual.head.weight"),
    (lambda s: s.__setitem__("module.transformer.resblocks.2.ln_1.weight", torch.zeros(WIDTH)),
     "unexpected key module.transformer.resblocks.2.ln_1.weight"),
])
def test_damaged_files_are_refused_naming_the_key(shared_file, tmp_path, change, named):
    path = damaged(shared_file, tmp_path, change)
    for load in (lambda: backbone.load_clip("tiny-sharedclip", path),
                 lambda: sharedclip.create_model_and_transforms("tiny-sharedclip", pretrained=path)):
        message = one_line_error(load)
        assert named in message and path in message, message
    message = one_line_error(evaluate.load_model, "tiny-sharedclip", path, error=evaluate.EvalError)
    assert named in message


def test_a_file_for_another_size_says_which_config_fits(shared_file):
    message = one_line_error(backbone.load_clip, "tiny-vit", str(shared_file))
    assert "fits tiny-sharedclip" in message and "tiny-vit" in message


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = None


def test_pickled_code_is_refused_and_never_run(shared_file, tmp_path):
    global MARKER
    MARKER = tmp_path / "ran"
    path = damaged(shared_file, tmp_path,
                   lambda s: s.__setitem__("module.logit_scale", RunsCode()))
    for load in (lambda: backbone.load_clip("tiny-sharedclip", path),
                 lambda: released.import_released(path),
                 lambda: evaluate.load_model("tiny-sharedclip", path)):
        message = one_line_error(load, error=(CheckpointError, evaluate.EvalError))
        assert "refused" in message and "pickled code" in message, message
    with pytest.raises(Exception):  # open_clip's own weights_only refusal
        sharedclip.create_model_and_transforms("tiny-sharedclip", pretrained=path)
    assert not MARKER.exists()


# --- hf-hub: names ------------------------------------------------------------------------

def hub_cache(root: Path, repo: str, files: dict) -> Path:
    """Hugging Face's cache layout: models--ORG--REPO/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(Path(source).read_bytes())
    return root


def run_offline(hf_home, *args):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "pretraining.released", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_hf_hub_name_resolves_from_the_cache_offline(shared_file, theirs_shared, tmp_path):
    home = hub_cache(tmp_path / "hf", "sarahESL/AlignCLIP", {"epoch_30.pt": shared_file})
    out = tmp_path / "imported.pt"
    done = run_offline(home, "hf-hub:sarahESL/AlignCLIP", "--model", "tiny-sharedclip",
                       "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "tiny-sharedclip (tied" in done.stdout
    model = open_clip.create_model("tiny-clip-w64", pretrained=str(out), weights_only=True)
    assert_same_features(model.eval(), theirs_shared)


def test_hf_hub_name_not_in_the_cache_is_one_clear_line(tmp_path):
    done = run_offline(tmp_path / "empty", "hf-hub:sarahESL/AlignCLIP")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the Hugging Face cache" in lines[0], done.stderr
    assert "hf download sarahESL/AlignCLIP" in lines[0]


def test_hf_hub_names_in_process(shared_file, untied_file, theirs_shared, tmp_path, monkeypatch):
    from huggingface_hub import constants
    home = hub_cache(tmp_path / "hf", "sarahESL/AlignCLIP",
                     {"shared.pt": shared_file, "untied.pt": untied_file})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    # a file named in the repository; the methods' loader and the evaluation
    model, _ = backbone.load_clip("tiny-sharedclip", "hf-hub:sarahESL/AlignCLIP/shared.pt")
    assert_same_features(model, theirs_shared)
    model, _, _, tied = evaluate.load_model("tiny-sharedclip", "hf-hub:sarahESL/AlignCLIP/shared.pt")
    assert tied
    # two checkpoint files and none named: which one is asked
    message = one_line_error(layouts.resolve_hf_hub, "hf-hub:sarahESL/AlignCLIP")
    assert "shared.pt, untied.pt" in message
    message = one_line_error(layouts.resolve_hf_hub, "hf-hub:sarahESL/AlignCLIP/other.pt")
    assert "no other.pt" in message
    message = one_line_error(evaluate.load_model, "tiny-sharedclip", "hf-hub:someone/missing",
                             error=evaluate.EvalError)
    assert "not in the Hugging Face cache" in message
