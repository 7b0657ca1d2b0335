"""Mixed precision (algorithms/core/method.py): the `precision` hyperparameter in both
harnesses, the choice of bf16 / fp16 + GradScaler / fp32, fp32 unchanged bit for bit,
a bf16 autocast step of every training method on the CPU with its loss in fp32, and the
fused attention kept in the tapped forward."""
import contextlib
import types

import pytest
import torch
import torch.nn.functional as F

from algorithms import alignclip as ac
from algorithms import backbone, clipood
from algorithms.clipood import margin_logits
from algorithms.core import method as core
from algorithms.core import precision as policy
from algorithms.core.registry import get_method, methods
from common import env as harness_env
from tests.conftest import TINY, needs_coop, needs_domainbed

CLASSES = ["circle", "square", "star"]
BATCH = (torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
         torch.tensor([0, 1, 2, 0, 1, 2]))
TRAINING = sorted(name for name, cls in methods().items() if cls.trains)


@pytest.fixture(autouse=True)
def no_feature_cache(monkeypatch):
    monkeypatch.setenv(harness_env.CACHE, "off")


def make(name, **overrides):
    method_cls = get_method(name)
    values = {**TINY, **overrides}
    if "lr" in method_cls.hparams():
        values["lr"] = 1e-3
    torch.manual_seed(0)
    return method_cls.create(CLASSES, values, total_steps=5)


# --- the choice ------------------------------------------------------------------------

def test_auto_picks_bf16_where_native_fp16_with_scaler_otherwise_fp32_on_cpu(monkeypatch):
    asked = []

    def no_bf16(including_emulation=True):
        asked.append(including_emulation)
        return False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", no_bf16)
    assert policy.choose_precision("auto", "cuda") == "fp16"
    assert policy.choose_precision(None, torch.device("cuda", 0)) == "fp16"
    assert policy.scales_gradients("fp16")
    assert asked == [False, False]  # emulated bf16 (pre-Ampere) does not count
    with pytest.raises(ValueError, match="no native bf16"):
        policy.choose_precision("bf16", "cuda")
    assert policy.choose_precision("fp32", "cuda") == "fp32"

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert policy.choose_precision("auto", "cuda:0") == "bf16"
    assert not policy.scales_gradients("bf16") and not policy.scales_gradients("fp32")
    assert policy.choose_precision("auto", "cpu") == "fp32"
    assert policy.choose_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision 'half'"):
        policy.choose_precision("half", "cpu")


def test_every_method_declares_precision_and_old_records_mean_auto():
    for name, method_cls in methods().items():
        assert method_cls.hparams()["precision"].default == "auto", name
    method = make("ZSCLIP")
    assert method.precision == "fp32" and method.grad_scaler is None  # CPU
    # a record saved before `precision` existed: its config is the declared default, auto
    assert get_method("ZSCLIP").create(CLASSES, TINY).precision == "fp32"


def test_fp16_steps_through_the_grad_scaler():
    method = make("CLIPood", precision="fp16")
    assert method.precision == "fp16" and isinstance(method.grad_scaler, torch.amp.GradScaler)
    calls = []
    scale = method.grad_scaler.scale
    method.grad_scaler.scale = lambda loss: calls.append(loss.dtype) or scale(loss)
    before = method.visual.proj.detach().clone()
    summary = method.update(*BATCH)
    assert calls == [torch.float32] and torch.isfinite(torch.tensor(summary["loss"]))
    # an overflowing first scale skips the update (and lowers the scale): run until one lands
    for _ in range(20):
        if not torch.equal(before, method.visual.proj):
            break
        method.update(*BATCH)
    assert not torch.equal(before, method.visual.proj)
    method.precision = "fp32"  # no scaler outside fp16, even once one was made
    assert method.grad_scaler is None


# --- fp32: the numbers of the harness before precision existed -------------------------

def _without_precision(monkeypatch):
    """The methods as they were: encoders called directly, no autocast contexts, no scaler."""
    monkeypatch.setattr(core.CLIPMethod, "run_encoder",
                        lambda self, encoder, *a, **k: encoder(*a, **k))
    monkeypatch.setattr(core.CLIPMethod, "fp32", lambda self: contextlib.nullcontext())
    monkeypatch.setattr(core.CLIPMethod, "grad_scaler", property(lambda self: None))


def _run(name):
    method = make(name, precision="fp32").train()
    summaries = [method.update(*BATCH) for _ in range(2)]
    method.eval()
    with torch.no_grad():
        outputs = (method.predict(BATCH[0]), method.encode_image(BATCH[0]))
    return summaries, outputs, {k: v.clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize("name", sorted(methods()))
def test_fp32_is_bit_for_bit_what_it_was(name, monkeypatch):
    now = _run(name)
    with monkeypatch.context() as m:
        _without_precision(m)
        before = _run(name)
    assert now[0] == before[0]
    for a, b in zip(now[1], before[1]):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert now[2].keys() == before[2].keys()
    assert all(torch.equal(now[2][k], before[2][k]) for k in now[2])


def test_fp32_losses_match_the_formulas_exactly():
    images, labels = BATCH
    ood = make("CLIPood", precision="fp32")
    with torch.no_grad():
        features = F.normalize(ood.visual(images), dim=-1)
        expected = F.cross_entropy(margin_logits(features, ood.class_embeddings, labels, 0.3,
                                                 ood.logit_scale), labels)
        assert torch.equal(ood.loss(images, labels)[0], expected)
        probe = make("CLIPLP", precision="fp32")
        logits = probe.head(F.normalize(probe.clip.encode_image(images), dim=-1))
        assert torch.equal(probe.predict(images), logits)


# --- bf16 autocast on the CPU: every training method steps, losses in fp32 -------------

ALIGNCLIP_LOSS = ("margin_logits", "soft_cross_entropy", "layer_averaged_attention",
                  "aal_target", "attention_alignment_loss", "similarity_alignment_loss")
LOSS_FUNCTIONS = {ac: ALIGNCLIP_LOSS, clipood: ("margin_logits",), F: ("cross_entropy",)}


@pytest.mark.parametrize("name", TRAINING)
def test_bf16_step_runs_with_the_encoder_in_bf16_and_the_loss_in_fp32(name, monkeypatch):
    method = make(name, precision="bf16").train()
    assert method.precision == "bf16" and method.grad_scaler is None
    seen = []  # (function, dtypes of its tensor arguments, autocast on?)
    for module, names in LOSS_FUNCTIONS.items():
        for fn_name in names:
            fn = getattr(module, fn_name)

            def recorded(*args, _fn=fn, _name=fn_name, **kwargs):
                tensors = [t for a in args for t in (a if isinstance(a, list) else [a])]
                dtypes = {t.dtype for t in tensors if torch.is_tensor(t) and t.is_floating_point()}
                out = _fn(*args, **kwargs)
                seen.append((_name, dtypes | {out.dtype}, torch.is_autocast_enabled("cpu")))
                return out
            monkeypatch.setattr(module, fn_name, recorded)
    encoder_dtypes = []
    block = method.clip.visual.transformer.resblocks[0].mlp.c_fc
    handle = block.register_forward_hook(lambda m, i, o: encoder_dtypes.append(o.dtype))
    trained = [p for p in method.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    try:
        summary = method.update(*BATCH)
    finally:
        handle.remove()
    assert torch.isfinite(torch.tensor(summary["loss"]))
    assert encoder_dtypes and set(encoder_dtypes) == {torch.bfloat16}, encoder_dtypes
    assert seen, "no loss function was called"
    expected = {"AlignCLIP": set(ALIGNCLIP_LOSS),
                "CLIPood": {"margin_logits", "cross_entropy"}}.get(name, {"cross_entropy"})
    assert {fn for fn, _, _ in seen} == expected
    for fn, dtypes, autocast_on in seen:
        assert dtypes == {torch.float32} and not autocast_on, (fn, dtypes, autocast_on)
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))


def test_bf16_alignclip_loss_is_the_fp32_formula_of_the_bf16_forward():
    """What bf16 changes is the encoder forward only: the loss is exactly the fp32
    formula applied to the (bf16-computed, fp32-cast) taps."""
    method = make("AlignCLIP", precision="bf16")
    images, labels = BATCH
    with torch.no_grad():
        loss, summary = method.loss(images, labels)
        taps = method.run_encoder(backbone.encode_image_taps, method.clip, images,
                                  attn_layers=method.attn_layers, dv_start=method.dv_start,
                                  visual=method.visual)
        assert {t.dtype for t in (taps.cls, taps.patches, taps.dv_patches,
                                  *taps.cls_attn.values())} == {torch.float32}
        logits = margin_logits(F.normalize(taps.cls, dim=-1), method.class_embeddings, labels,
                               0.3, method.logit_scale)
        cls = ac.soft_cross_entropy(logits, ac.sls_targets(method.sls, labels, 0.9))
        aal = ac.attention_alignment_loss(
            ac.layer_averaged_attention([taps.cls_attn[i] for i in method.attn_layers]),
            ac.aal_target(taps.dv_patches, method.class_embeddings[labels]))
        last = ac.similarity_alignment_loss(taps.patches, taps.dv_patches,
                                            method.class_embeddings)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, cls + 10.0 * (aal + last))
    assert summary["loss_cls"] == cls.item()


@pytest.mark.parametrize("name", ["ZSCLIP", "CLIPLP", "CLIPood", "CALIP", "CALIPFS"])
def test_bf16_evaluation_gives_fp32_logits_close_to_fp32(name):
    fp32, bf16 = make(name, precision="fp32"), make(name, precision="bf16")
    with torch.no_grad():
        exact, mixed = fp32.predict(BATCH[0]), bf16.predict(BATCH[0])
    assert mixed.dtype == torch.float32 and not torch.equal(exact, mixed)  # autocast ran
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())


def test_tapped_forward_keeps_fused_attention_in_bf16(monkeypatch):
    method = make("AlignCLIP", precision="bf16", dv_mode="vvv")
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recorded(q, k, v, *args, **kwargs):
        calls.append((q.dtype, k.dtype, v.dtype, tuple(q.shape)))
        return sdpa(q, k, v, *args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    blocks = len(method.visual.transformer.resblocks)
    with torch.no_grad():
        taps = method.run_encoder(backbone.encode_image_taps, method.clip, BATCH[0],
                                  attn_layers=(0, 1), dv_start=2, dv_mode="vvv")
    # one fused call per block, plus one per D-V block ('vvv'), all on bf16 Q, K, V
    assert len(calls) == blocks + (blocks - 2)
    assert {c[:3] for c in calls} == {(torch.bfloat16,) * 3}
    for row in taps.cls_attn.values():  # the CLS rows in fp32, a distribution over keys
        assert row.dtype == torch.float32 and bool((row.sum(-1) <= 1 + 1e-6).all())


# --- recorded in the result records ----------------------------------------------------

@needs_domainbed
def test_domainbed_record_holds_the_resolved_precision(monkeypatch):
    import domainbed.algorithms
    import domainbed.datasets
    import domainbed.hparams_registry
    from domainbed_adapter import patches
    patches.patch_loaded()
    hparams = dict(domainbed.hparams_registry.default_hparams("ZSCLIP", "CLIPWorld"), **TINY)
    assert hparams["precision"] == "auto"
    hparams["class_names"] = ["circle", "square"]
    torch.manual_seed(0)
    domainbed.algorithms.get_algorithm_class("ZSCLIP")((3, 64, 64), 2, 3, hparams)
    assert hparams["precision"] == "fp32"  # train.py writes this dict into every record


@needs_coop
def test_dassl_config_and_record_hold_the_precision():
    from dassl.config import get_cfg_default
    from trainers import dassl_adapter as da
    cfg = get_cfg_default()
    da.add_method_configs(cfg)
    assert cfg.TRAINER.ALIGNCLIP.PRECISION == "auto"
    cfg.TRAINER.ALIGNCLIP.PRECISION = "bf16"
    assert da.method_config(cfg, get_method("AlignCLIP")).precision == "bf16"
    harness = types.SimpleNamespace(model=types.SimpleNamespace(precision="bf16"), cfg=cfg)
    assert da.run_precision(harness) == "bf16"
    from yacs.config import CfgNode as CN
    cfg.TRAINER.NAME = "CoOp"
    cfg.TRAINER.COOP = CN({"PREC": "fp16"})
    assert da.run_precision(types.SimpleNamespace(model=torch.nn.Linear(1, 1), cfg=cfg)) == "fp16"


def test_comalign_components_are_encoded_at_the_methods_precision(monkeypatch):
    """The component path (figure-mean fusion needs entity and relation views) runs the
    image encoder through run_encoder: bf16 inside, fp32 scores out."""
    seen = []
    for precision in ("fp32", "bf16"):
        method = make("ComAlign", precision=precision, fusion="figure_mean")
        encode = method.clip.encode_image

        def spy(images, *args, **kwargs):
            out = encode(images, *args, **kwargs)
            seen.append((precision, out.dtype))
            return out
        monkeypatch.setattr(method.clip, "encode_image", spy)
        with torch.no_grad():
            logits = method.predict(BATCH[0])
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert {dtype for p, dtype in seen if p == "fp32"} == {torch.float32}
    assert {dtype for p, dtype in seen if p == "bf16"} == {torch.bfloat16}
