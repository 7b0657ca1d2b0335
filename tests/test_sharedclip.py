"""SharedCLIP (pretraining/sharedclip.py): the towers really share one transformer, final
LayerNorm and projection; it is smaller than the same-width CLIP; its checkpoint is a plain
open_clip state dict that an untied open_clip CLIP loads with identical features."""
import json
import logging

import open_clip
import pytest
import torch

from pretraining import sharedclip

logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return sharedclip.create_model_and_transforms("tiny-sharedclip")[0]


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 64, 64, generator=g)
    texts = open_clip.get_tokenizer("tiny-sharedclip")(["a red circle", "a blue square", "x"])
    return images, texts


def test_configs_are_registered_and_the_shared_mark_is_the_folder():
    sharedclip.register_model_configs()
    names = open_clip.list_models()
    for name in ("SharedCLIP-ViT-B-16", "SharedCLIP-ViT-B-16-512", "tiny-sharedclip",
                 "CLIP-ViT-B-16-w768", "tiny-clip-w64"):
        assert name in names
    assert sharedclip.is_shared("tiny-sharedclip") and sharedclip.is_shared("SharedCLIP-ViT-B-16")
    assert not sharedclip.is_shared("tiny-clip-w64") and not sharedclip.is_shared("ViT-B-16")
    # the plain twins differ from the shared configs only in where they live
    assert open_clip.get_model_config("tiny-clip-w64") == open_clip.get_model_config("tiny-sharedclip")
    assert (open_clip.get_model_config("CLIP-ViT-B-16-w768")
            == open_clip.get_model_config("SharedCLIP-ViT-B-16"))
    b16 = open_clip.get_model_config("SharedCLIP-ViT-B-16")
    assert b16["embed_dim"] == 768 and b16["vision_cfg"]["width"] == b16["text_cfg"]["width"] == 768
    assert open_clip.get_model_config("SharedCLIP-ViT-B-16-512")["embed_dim"] == 512
    for path in sharedclip.CONFIG_DIR.rglob("*.json"):  # the keys open_clip's CLIP takes
        keys = set(json.loads(path.read_text()))
        assert {"embed_dim", "vision_cfg", "text_cfg"} <= keys <= {
            "embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}, path


def test_the_towers_share_one_transformer_layernorm_and_projection(model):
    assert sharedclip.is_tied(model)
    assert model.visual.transformer is model.transformer
    assert model.visual.ln_post is model.ln_final
    assert model.visual.proj is model.text_projection
    shared = model.transformer.resblocks[0].attn.in_proj_weight
    assert model.visual.transformer.resblocks[0].attn.in_proj_weight.data_ptr() == shared.data_ptr()
    # modality-specific parts stay separate
    assert model.visual.positional_embedding.shape != model.positional_embedding.shape
    assert model.visual.conv1.weight is not None and model.token_embedding.weight is not None


def test_image_only_and_text_only_losses_both_reach_the_shared_weights(model):
    images, texts = _inputs()
    shared = [model.transformer.resblocks[-1].mlp.c_fc.weight, model.ln_final.weight,
              model.text_projection]
    for encode in (lambda: model.encode_image(images), lambda: model.encode_text(texts)):
        model.zero_grad(set_to_none=True)
        encode().pow(2).sum().backward()
        for p in shared:
            assert p.grad is not None and p.grad.abs().sum() > 0
    # the image loss does not touch text-only weights, and vice versa
    model.zero_grad(set_to_none=True)
    model.encode_image(images).sum().backward()
    assert model.token_embedding.weight.grad is None
    model.zero_grad(set_to_none=True)
    model.encode_text(texts).sum().backward()
    assert model.visual.conv1.weight.grad is None
    model.zero_grad(set_to_none=True)


def test_fewer_parameters_than_the_same_width_clip(model):
    torch.manual_seed(0)
    plain = sharedclip.create_model_and_transforms("tiny-clip-w64")[0]
    assert not sharedclip.is_tied(plain)
    shared_part = sum(p.numel() for p in (*model.transformer.parameters(),
                                          *model.ln_final.parameters(), model.text_projection))
    assert sharedclip.num_parameters(model) == sharedclip.num_parameters(plain) - shared_part
    assert set(model.state_dict()) == set(plain.state_dict())  # same checkpoint keys


def test_checkpoint_reloads_untied_in_plain_open_clip_with_identical_features(model, tmp_path):
    ckpt = tmp_path / "shared.pt"
    torch.save(model.state_dict(), ckpt)
    sharedclip.register_model_configs()
    plain = open_clip.create_model_and_transforms("tiny-sharedclip", pretrained=str(ckpt))[0]
    tied = sharedclip.create_model_and_transforms("tiny-sharedclip", pretrained=str(ckpt))[0]
    assert not sharedclip.is_tied(plain) and sharedclip.is_tied(tied)
    images, texts = _inputs()
    for m in (model, plain, tied):
        m.eval()
    with torch.no_grad():
        for other in (plain, tied):
            assert torch.equal(model.encode_image(images), other.encode_image(images))
            assert torch.equal(model.encode_text(texts), other.encode_text(texts))


def test_an_untied_checkpoint_is_refused_by_the_shared_loader(tmp_path):
    torch.manual_seed(0)
    plain = sharedclip.create_model_and_transforms("tiny-clip-w64")[0]
    ckpt = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), ckpt)
    with pytest.raises(ValueError, match="not a SharedCLIP checkpoint"):
        sharedclip.create_model_and_transforms("tiny-sharedclip", pretrained=str(ckpt))
    with pytest.raises(ValueError, match="towers differ"):
        sharedclip.tie_towers(open_clip.CLIP(  # the harness's tiny-vit: towers of 96 and 64
            embed_dim=64, vision_cfg=dict(image_size=64, layers=4, width=96, head_width=32,
                                          patch_size=8),
            text_cfg=dict(context_length=32, width=64, heads=2, layers=2)))
