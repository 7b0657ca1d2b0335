"""CoOp, CoCoOp and KgCoOp (algorithms/coop.py, cocoop.py, kgcoop.py): prompt assembly and
class-token positions on hand-made token ids and embeddings, the text tower on
embeddings against open_clip's encode_text, KgCoOp's term by hand, CoCoOp's meta-net,
base-to-new loading, a DomainBed job and a Dassl base-to-new chain on the generated world."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from algorithms import backbone
from algorithms.cocoop import conditioned_context, meta_net
from algorithms.coop import (PromptLearner, assemble_prompts, class_token_order,
                             encode_prompts, prompt_template)
from algorithms.core.registry import get_method
from algorithms.kgcoop import knowledge_distance
from tests.conftest import (CLIP_WORLD_CONFIG, REPO, TINY, base_then_new, job_records, needs_coop,
                            needs_domainbed, train_domainbed)

CLASSES = ["circle", "square", "big star"]
BATCH = (torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
         torch.tensor([0, 1, 2, 0, 1, 2]))
SOS, EOT, X, DOT, CIRCLE, BIG, STAR = 49406, 49407, 343, 269, 7117, 1205, 1565


def make(name, classes=CLASSES, **overrides):
    torch.manual_seed(0)
    return get_method(name).create(classes, {**TINY, **overrides}, total_steps=10)


@pytest.fixture(scope="module")
def tokenizer():
    return backbone.load_clip("tiny-vit", None)[1]


# --- prompt assembly, by hand ---------------------------------------------------------

def test_template_token_ids_by_hand(tokenizer):
    ids, name_lens = prompt_template(tokenizer, ["circle", "big star"], 2)
    assert name_lens == [1, 2]
    assert ids[0, :7].tolist() == [SOS, X, X, CIRCLE, DOT, EOT, 0]
    assert ids[1, :7].tolist() == [SOS, X, X, BIG, STAR, DOT, EOT]
    init, _ = prompt_template(tokenizer, ["circle"], 4, "a photo of a")
    assert init[0, :8].tolist() == [SOS, *tokenizer.encode("a photo of a"), CIRCLE, DOT, EOT]


def test_class_token_positions_by_hand():
    # template positions: 0 SOS, 1-2 context, then the name (1 or 2 tokens), ".", EOT, pad
    order = {p: class_token_order([1, 2], 2, p, 8).tolist() for p in ("end", "middle", "front")}
    assert order["end"] == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert order["middle"] == [[0, 1, 3, 2, 4, 5, 6, 7], [0, 1, 3, 4, 2, 5, 6, 7]]
    assert order["front"] == [[0, 3, 1, 2, 4, 5, 6, 7], [0, 3, 4, 1, 2, 5, 6, 7]]
    with pytest.raises(ValueError, match="class_token_position"):
        class_token_order([1], 2, "start", 8)


def test_assembled_embeddings_put_context_and_name_in_place():
    # each template token's embedding is its position (x10 + class); context vectors are -1, -2
    template = torch.tensor([[10.0 * p + c for p in range(8)] for c in range(2)]).unsqueeze(-1)
    ctx = torch.tensor([[-1.0], [-2.0]])
    got = {p: assemble_prompts(ctx, template, class_token_order([1, 2], 2, p, 8))[..., 0].tolist()
           for p in ("end", "middle", "front")}
    # class 0 "circle" (position 3), class 1 "big star" (positions 3, 4)
    assert got["end"] == [[0, -1, -2, 30, 40, 50, 60, 70], [1, -1, -2, 31, 41, 51, 61, 71]]
    assert got["middle"] == [[0, -1, 30, -2, 40, 50, 60, 70], [1, -1, 31, 41, -2, 51, 61, 71]]
    assert got["front"] == [[0, 30, -1, -2, 40, 50, 60, 70], [1, 31, 41, -1, -2, 51, 61, 71]]
    per_class = torch.tensor([[[-1.0], [-2.0]], [[-3.0], [-4.0]]])  # csc: [C, n, D]
    assert assemble_prompts(per_class, template, class_token_order([1, 2], 2, "end", 8))[
        1, 1:3, 0].tolist() == [-3.0, -4.0]
    per_image = torch.tensor([[[-1.0], [-2.0]], [[-5.0], [-6.0]]]).unsqueeze(1)  # [B, 1, n, D]
    batched = assemble_prompts(per_image, template, class_token_order([1, 2], 2, "end", 8))
    assert batched.shape == (2, 2, 8, 1) and batched[1, :, 1:3, 0].tolist() == [[-5, -6], [-5, -6]]


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_text_tower_on_embeddings_is_encode_text(tiny_clip, position):
    """encode_prompts on the assembled embeddings of a context that is token embeddings
    is open_clip's encode_text of the same token ids, the class name moved as asked."""
    clip, tokenizer = tiny_clip
    learner = PromptLearner(clip, tokenizer, CLASSES, n_ctx=4, ctx_init="a photo of a",
                            position=position)
    ids = learner.token_ids
    name = {"end": [5], "middle": [3], "front": [1]}[position]  # where "circle" lands
    assert ids[0, name].tolist() == [CIRCLE] and (ids == EOT).sum() == len(CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(encode_prompts(clip, learner(), ids), clip.encode_text(ids))


def test_coop_starts_as_zero_shot_clip_and_learns_only_the_context():
    method = make("CoOpHarness", lr=1e-2)
    zero_shot = make("ZSCLIP")
    with torch.no_grad():
        torch.testing.assert_close(method.predict(BATCH[0]), zero_shot.predict(BATCH[0]))
    assert [k for k in method.state_dict()] == ["prompt.ctx"]
    assert method.prompt.ctx.shape == (4, method.prompt.template.shape[-1])
    before = method.prompt.ctx.detach().clone()
    method.train()
    summary = method.update(*BATCH)
    assert math.isfinite(summary["loss"]) and not torch.equal(before, method.prompt.ctx)
    assert isinstance(method.training_state.optimizer, torch.optim.SGD)


def test_class_specific_context_and_bad_settings_are_refused(tokenizer):
    method = make("CoOpHarness", csc=True, ctx_init="", n_ctx=2)
    assert method.prompt.ctx.shape == (3, 2, method.prompt.template.shape[-1])
    with pytest.raises(ValueError, match="is 4 tokens but n_ctx is 16"):
        make("CoOpHarness", n_ctx=16)
    with pytest.raises(ValueError, match="csc"):
        make("CoOpHarness", csc=True)
    with pytest.raises(ValueError, match="does not fit"):
        make("CoOpHarness", classes=["circle", " ".join(["star"] * 40)])


def test_a_base_class_model_loads_into_new_classes():
    """Only the context is saved: the base-to-new protocol evaluates it on other classes."""
    for name in ("CoOpHarness", "CoCoOpHarness"):
        base = make(name, lr=1e-2)
        base.update(*BATCH)
        new = make(name, classes=["arrow", "heart", "moon", "cross"])
        new.load_state_dict(base.state_dict())
        torch.testing.assert_close(new.prompt.ctx, base.prompt.ctx)
        assert new.predict(BATCH[0]).shape == (6, 4)


# --- KgCoOp ----------------------------------------------------------------------------

def test_knowledge_distance_by_hand():
    learned = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    hand = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cosines 1 and 1/sqrt(2): 1 - (1 + 0.70711) / 2
    assert knowledge_distance(learned, hand).item() == pytest.approx(1 - (1 + 2 ** -0.5) / 2)


def test_kgcoop_loss_is_cross_entropy_plus_lambda_times_the_distance():
    method = make("KgCoOp", lr=1e-2, kg_lambda=8.0)
    loss, summary = method.loss(*BATCH)
    assert summary["loss_kg"] == pytest.approx(0.0, abs=1e-6)  # starts at the hand-crafted prompt
    method.update(*BATCH)
    loss, summary = method.loss(*BATCH)
    with torch.no_grad():
        text = method.text_features()
        expected = 1 - F.cosine_similarity(text, method.class_embeddings, dim=-1).mean()
        logits = method.logit_scale * method.encode_image(BATCH[0]) @ text.T
    assert summary["loss_kg"] == pytest.approx(expected.item(), rel=1e-5) and expected > 0
    assert summary["loss_ce"] == pytest.approx(F.cross_entropy(logits, BATCH[1]).item(), rel=1e-5)
    assert loss.item() == pytest.approx(summary["loss_ce"] + 8.0 * summary["loss_kg"], rel=1e-5)


# --- CoCoOp ----------------------------------------------------------------------------

def test_meta_net_shapes_and_conditioning():
    net = meta_net(64, 32)
    assert [tuple(p.shape) for p in net.parameters()] == [(4, 64), (4,), (32, 4), (32,)]
    ctx, shift = torch.zeros(3, 2), torch.tensor([[1.0, 2.0], [5.0, 6.0]])
    conditioned = conditioned_context(ctx, shift)  # every vector shifted by its image's shift
    assert conditioned.shape == (2, 1, 3, 2)
    assert conditioned[1, 0].tolist() == [[5.0, 6.0]] * 3


def test_cocoop_conditions_each_image_and_trains_its_meta_net():
    method = make("CoCoOpHarness", lr=1e-2)
    coop = make("CoOpHarness")
    with torch.no_grad():
        method.meta_net[2].weight.zero_()
        method.meta_net[2].bias.zero_()  # no shift: CoOp's prompts for every image
        torch.testing.assert_close(method.predict(BATCH[0]), coop.predict(BATCH[0]))
        method.meta_net[2].bias.fill_(0.5)
        features = method.encode_image(BATCH[0])
        one_by_one = torch.cat([method.conditioned_logits(f[None]) for f in features])
        torch.testing.assert_close(method.predict(BATCH[0]), one_by_one)
    trained = make("CoCoOpHarness", lr=1e-2)
    before = [p.detach().clone() for p in trained.meta_net.parameters()]
    trained.update(*BATCH)
    assert all(not torch.equal(b, p) for b, p in zip(before, trained.meta_net.parameters()))


# --- both harnesses on the generated world -------------------------------------------------

@needs_domainbed
def test_domainbed_job_trains_only_the_prompt(small_world, tmp_path):
    out = tmp_path / "job"
    result = train_domainbed("KgCoOp", small_world, out, {**TINY, "batch_size": 4},
                             "--test_envs", "1", "--steps", "3", "--checkpoint_freq", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = job_records(out)
    assert [r["step"] for r in records] == [0, 2]
    assert {"loss", "loss_ce", "loss_kg"} <= set(records[-1])
    assert 0.0 <= records[-1]["env1_out_acc"] <= 1.0
    saved = torch.load(out / "model.pkl", weights_only=True)["model_dict"]
    assert set(saved) == {"method.prompt.ctx"}, set(saved)


@needs_coop
def test_dassl_base_to_new_chain(small_world, tmp_path):
    base, new = base_then_new("CoCoOpHarness", small_world, tmp_path, dataset=CLIP_WORLD_CONFIG)
    assert base.returncode == 0, base.stderr[-3000:]
    assert (tmp_path / "base" / "model" / "model.pth.tar-1").is_file()
    assert new.returncode == 0, new.stderr[-3000:]
    records = {s: json.loads((tmp_path / s / "results.json").read_text()) for s in ("base", "new")}
    assert records["base"]["subsample_classes"] == "base" and records["new"]["subsample_classes"] == "new"
    assert records["new"]["run"]["config"]["n_ctx"] == 4
    assert all(0 <= r["metrics"]["accuracy"] <= 100 for r in records.values())


@needs_coop
def test_protocol_budgets_and_recipes_are_coops_configs():
    import recipes
    import yaml
    from sweeps import coop_protocols as cp
    configs = REPO / "third_party" / "CoOp" / "configs" / "trainers"
    for trainer, config in (("CoOpHarness", "CoOp/vit_b16_ctxv1.yaml"),
                            ("CoCoOpHarness", "CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml")):
        reference = yaml.safe_load((configs / config).read_text())
        opts = dict(zip(*[iter(cp.load_settings(trainer).opts)] * 2))
        assert int(opts["DATALOADER.TRAIN_X.BATCH_SIZE"]) == reference["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"]
        assert int(opts["OPTIM.MAX_EPOCH"]) == reference["OPTIM"]["MAX_EPOCH"]
        book = recipes.values(trainer, "dassl")
        assert book["lr"] == reference["OPTIM"]["LR"]
        node = next(iter(reference["TRAINER"].values()))
        # CoOp's config sets no N_CTX: ctx_init's words decide it (one token each here)
        words = len(node["CTX_INIT"].split())
        assert book["ctx_init"] == node["CTX_INIT"] and book["n_ctx"] == node.get("N_CTX", words)
    assert cp.load_settings("CoOpHarness").opts_by_dataset["imagenet"] == ["OPTIM.MAX_EPOCH", "50"]
    assert recipes.values("KgCoOp", "dassl")["kg_lambda"] == 8.0
