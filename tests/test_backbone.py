import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image

from algorithms import backbone


def test_taps_match_open_clip_forward(tiny_clip):
    model, _ = tiny_clip
    x = torch.randn(3, 3, 64, 64)
    taps = backbone.encode_image_taps(model, x, attn_layers=(0, 2), dv_start=1)
    torch.testing.assert_close(taps.cls, model.encode_image(x), atol=1e-5, rtol=1e-5)
    grid = model.visual.grid_size[0] * model.visual.grid_size[1]
    assert taps.patches.shape == (3, grid, model.visual.output_dim)
    assert sorted(taps.cls_attn) == [0, 2]


def _block_inputs(model, x):
    """Main-stream input of every block, via open_clip's own blocks."""
    h = model.visual._embeds(x)
    inputs = []
    for blk in model.visual.transformer.resblocks:
        inputs.append(h)
        h = blk(h)
    return inputs


def test_cls_attention_equals_multihead_attention_weights(tiny_clip):
    model, _ = tiny_clip
    x = torch.randn(2, 3, 64, 64)
    taps = backbone.encode_image_taps(model, x, attn_layers=(1,))
    blk = model.visual.transformer.resblocks[1]
    h = blk.ln_1(_block_inputs(model, x)[1])
    _, weights = blk.attn(h, h, h, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(taps.cls_attn[1], weights[:, 0, 1:], atol=1e-6, rtol=1e-5)
    assert (taps.cls_attn[1].sum(-1) < 1).all()  # the CLS key's share is left out


def test_dv_branch_equals_its_formula(tiny_clip):
    """x_dv = x_s + sum_{l>=s} out_proj(V_l(ln_1(x_l))), then ln_post and proj."""
    model, _ = tiny_clip
    x = torch.randn(2, 3, 64, 64)
    start = 2
    taps = backbone.encode_image_taps(model, x, dv_start=start)
    inputs = _block_inputs(model, x)
    x_dv = inputs[start]
    for blk, h in zip(model.visual.transformer.resblocks[start:], inputs[start:]):
        d = h.shape[-1]
        v = F.linear(blk.ln_1(h), blk.attn.in_proj_weight[2 * d:], blk.attn.in_proj_bias[2 * d:])
        x_dv = x_dv + blk.attn.out_proj(v)
    expected = model.visual.ln_post(x_dv[:, 1:]) @ model.visual.proj
    torch.testing.assert_close(taps.dv_patches, expected, atol=1e-5, rtol=1e-5)


def test_taps_reject_bad_layers_and_resnets(tiny_clip):
    model, _ = tiny_clip
    with pytest.raises(ValueError, match="outside"):
        backbone.encode_image_taps(model, torch.randn(1, 3, 64, 64), attn_layers=(9,))
    resnet, _ = backbone.load_clip("tiny-rn", None)
    assert resnet.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 64)
    with pytest.raises(NotImplementedError, match="ViT"):
        backbone.encode_image_taps(resnet, torch.randn(1, 3, 64, 64))


def test_text_classifier_is_a_normalised_template_ensemble(tiny_clip):
    model, tokenizer = tiny_clip
    names = ["circle", "alarm clock"]
    weights = backbone.text_classifier(model, tokenizer, names, ["a {}.", "the {}!"])
    assert weights.shape == (2, model.text_projection.shape[1])
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        per_template = [F.normalize(model.encode_text(tokenizer([t.format(n) for n in names])), dim=-1)
                        for t in ["a {}.", "the {}!"]]
    expected = F.normalize(sum(per_template) / 2, dim=-1)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)


def test_template_resolution():
    assert backbone.resolve_templates("photo") == ("a photo of a {}.",)
    assert len(backbone.resolve_templates("openai_imagenet")) == 80
    assert backbone.resolve_templates("a drawing of a {}.") == ("a drawing of a {}.",)
    with pytest.raises(ValueError, match="unknown template set"):
        backbone.resolve_templates("nonsense")


def test_local_checkpoint_loads_with_weights_only(tmp_path, tiny_clip):
    model, _ = tiny_clip
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded, _ = backbone.load_clip("tiny-vit", str(path))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        backbone.load_clip("tiny-vit", str(tmp_path / "missing.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pt"):
        backbone.load_clip("tiny-vit", str(corrupt))
    with pytest.raises(ValueError, match="unknown CLIP model"):
        backbone.load_clip("no-such-model", None)


def test_clip_transforms():
    img = Image.new("RGB", (80, 50), (255, 255, 255))
    evaluated = backbone.clip_transform(64, train=False)(img)
    assert evaluated.shape == (3, 64, 64)
    # white maps to (1 - mean) / std per channel
    torch.testing.assert_close(evaluated[:, 0, 0], (1 - torch.tensor(OPENAI_DATASET_MEAN))
                               / torch.tensor(OPENAI_DATASET_STD))
    assert backbone.clip_transform(64, train=True)(img.convert("L")).shape == (3, 64, 64)


def test_openai_tags_run_with_quick_gelu():
    assert backbone.tag_uses_quick_gelu("ViT-B-16", "openai")
    assert not backbone.tag_uses_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    assert not backbone.tag_uses_quick_gelu("tiny-vit", None)
