import torch
import torch.nn.functional as F

from algorithms.core.registry import get_method
from tests.conftest import TINY


def make_zsclip(classnames=("circle", "square", "star")):
    torch.manual_seed(0)
    return get_method("ZSCLIP").create(list(classnames), TINY)


def test_zero_shot_logits_are_scaled_cosines():
    method = make_zsclip()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        image = F.normalize(method.clip.encode_image(x), dim=-1)
        text = F.normalize(method.clip.encode_text(method.tokenizer(
            [f"a photo of a {c}." for c in method.classnames])), dim=-1)
        expected = method.clip.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(method.predict(x), expected, atol=1e-4, rtol=1e-4)


def test_nothing_trains_and_nothing_is_saved():
    method = make_zsclip()
    assert method.update(torch.randn(2, 3, 64, 64), torch.tensor([0, 1])) == {}
    assert not method.has_trainable_parameters()
    assert method.state_dict() == {}
    method.load_state_dict({}, strict=True)  # frozen weights are rebuilt, not loaded


def test_frozen_parts_stay_in_eval_mode():
    method = make_zsclip()
    method.train()
    assert method.training and not method.clip.training
    assert not any(m.training for m in method.clip.modules())


def test_unknown_method_and_untyped_settings():
    import pytest
    with pytest.raises(KeyError, match="unknown method"):
        get_method("NoSuchMethod")
    with pytest.raises(TypeError, match="expected a ZeroShotCLIPConfig"):  # not a plain dict
        get_method("ZSCLIP")({"clip_model": "tiny-vit"}, None)
    with pytest.raises(ValueError, match="unknown hyperparameter clip_modl"):
        get_method("ZSCLIP").create(["a"], {"clip_modl": "tiny-vit"})
