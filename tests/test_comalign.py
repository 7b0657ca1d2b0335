"""ComAlign: parser, MaxSim, head, fusions, identity equality, regions, HDF5 cache,
training, evaluation, the registered method and the collector kind."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from algorithms import comalign_components as comp
from algorithms import comalign_head as H
from tests.conftest import TINY

# --- parser -------------------------------------------------------------------------------

CAPTIONS = [  # (caption, entities, relations)
    ("a photo of a large red circle to the left of a blue star.",
     ["large red circle", "blue star"], ["large red circle to the left of blue star"]),
    ("a sketch of an arrow.", ["arrow"], []),
    ("a painting of a small green half moon above an orange ring.",
     ["small green half moon", "orange ring"], ["small green half moon above orange ring"]),
    ("a cartoon of a large yellow cross below a purple heart.",
     ["large yellow cross", "purple heart"], ["large yellow cross below purple heart"]),
    ("A man riding a wave on top of a surfboard.", ["man", "wave", "surfboard"],
     ["man riding wave", "wave on top of surfboard"]),
    ("Two dogs playing with a frisbee in the grass.", ["dogs", "frisbee", "grass"],
     ["dogs playing with frisbee", "frisbee in grass"]),
    ("A kitchen with a stove and a sink.", ["kitchen", "stove", "sink"],
     ["kitchen with stove", "kitchen with sink"]),
    ("A man is standing next to a red bus.", ["man", "red bus"],
     ["man standing next to red bus"]),
    ("A woman holding an umbrella while walking down the street.",
     ["woman", "umbrella", "street"], ["woman holding umbrella", "woman walking down street"]),
    ("A cat sitting on a wooden bench.", ["cat", "wooden bench"], ["cat sitting on wooden bench"]),
]


@pytest.mark.parametrize("caption,entities,relations", CAPTIONS)
def test_rule_parser_phrases(caption, entities, relations):
    p = comp.rule_phrases(caption)
    assert list(p.entities) == entities and list(p.relations) == relations


def test_rule_parser_covers_the_generated_grammar_and_pads():
    from clipworld import generate as world
    rng = np.random.default_rng(0)
    for _ in range(50):
        f = {"domain": world.DOMAINS[rng.integers(4)], "size": world.SIZES[rng.integers(2)],
             "colour": list(world.COLOURS)[rng.integers(6)], "class": world.CLASSES[rng.integers(10)],
             "relation": world.RELATIONS[rng.integers(4)],
             "second_colour": list(world.COLOURS)[rng.integers(6)],
             "second_class": world.CLASSES[rng.integers(10)]}
        p = comp.rule_phrases(world.make_caption(f))
        first = f"{f['size']} {f['colour']} {f['class']}"
        second = f"{f['second_colour']} {f['second_class']}"
        assert p.entities[0] == first and p.relations == (f"{first} {f['relation']} {second}",)
    ents, emask, rels, rmask = comp.rule_phrases("a sketch of an arrow.").fixed(10, 10)
    assert len(ents) == len(rels) == 10 and emask == [True] + [False] * 9 and not any(rmask)


@pytest.mark.skipif(comp.spacy_pipeline() is None,
                    reason="spaCy's English pipeline (en_core_web_sm) is not installed")
def test_spacy_parser_phrases():
    nlp = comp.spacy_pipeline()
    p = comp.spacy_phrases("A man riding a wave on top of a surfboard.", nlp)
    assert "man" in p.entities and "surfboard" in p.entities and p.relations
    p = comp.spacy_phrases("a photo of a large red circle to the left of a blue star.", nlp)
    assert "blue star" in p.entities


# --- MaxSim -------------------------------------------------------------------------------

def test_maxsim_hand_computed_with_padding():
    e = torch.eye(3)
    a = torch.stack([e[0], e[1], torch.zeros(3)])[None]      # 2 valid + 1 padded
    a_mask = torch.tensor([[True, True, False]])
    b = torch.stack([e[0], F.normalize(e[0] + e[2], dim=0), torch.zeros(3)])[None]
    b_mask = torch.tensor([[True, True, False]])
    s_ab, s_ba = H.maxsim(a, a_mask, b, b_mask)
    # a0: max(1, .7071) = 1; a1: max(0, 0) = 0 -> mean 0.5
    # b0: max(1, 0) = 1; b1: max(.7071, 0) = .7071 -> mean .8536
    assert s_ab.shape == (1, 1)
    assert s_ab.item() == pytest.approx(0.5)
    assert s_ba.item() == pytest.approx((1 + 2 ** -0.5) / 2)
    # padding that would win if unmasked: a padded slot equal to b0 is ignored
    a2 = a.clone(); a2[0, 2] = e[2]
    assert H.maxsim(a2, a_mask, b, b_mask)[0].item() == pytest.approx(0.5)
    # empty sets score 0; aligned version equals the diagonal
    s_ab, s_ba = H.maxsim(a, torch.zeros_like(a_mask), b, b_mask)
    assert s_ab.item() == 0 and s_ba.item() == 0
    x, xm = torch.randn(4, 3, 5), torch.rand(4, 3) > 0.3
    y, ym = torch.randn(4, 2, 5), torch.rand(4, 2) > 0.3
    full, al = H.maxsim(x, xm, y, ym), H.maxsim_aligned(x, xm, y, ym)
    assert torch.allclose(full[0].diagonal(), al[0]) and torch.allclose(full[1].diagonal(), al[1])


# --- head, fusions, identity equality -----------------------------------------------------

def _side(n, D=16, seed=0, ne=10, nr=10):
    g = torch.Generator().manual_seed(seed)
    em = torch.rand(n, ne, generator=g) > 0.4
    rm = torch.rand(n, nr, generator=g) > 0.6
    return H.Side(torch.randn(n, D, generator=g), torch.randn(n, ne, D, generator=g) * em[..., None],
                  em, torch.randn(n, nr, D, generator=g) * rm[..., None], rm)


def test_head_shapes_and_reference_architecture():
    cfg = H.HeadConfig(dim=512)
    head = H.ComAlignHead(cfg).eval()
    s = _side(3, D=512)
    ent, rel, glob = head(s.entities, s.relations, s.global_, s.entity_mask, s.relation_mask)
    assert ent.shape == (3, 10, 512) and rel.shape == (3, 10, 512) and glob.shape == (3, 512)
    layer = head.encoder.layers[0]
    assert len(head.encoder.layers) == 2 and layer.self_attn.num_heads == 4
    assert layer.linear1.out_features == 512 and layer.dropout.p == 0.1
    assert head.positions.encodings.shape == (1, 21, 512)
    n_params = sum(p.numel() for p in head.parameters())
    assert 3.3e6 < n_params < 3.5e6  # ~3.42M as the reference's RetrievalModel in use


def test_identity_head_and_zero_component_weights_give_clip_scores_exactly():
    imgs, txts = _side(7, seed=1), _side(11, seed=2)
    images, token = H.refine(H.IdentityHead(), imgs)
    texts, _ = H.refine(H.IdentityHead(), txts)
    clip = F.normalize(imgs.global_, dim=-1) @ F.normalize(txts.global_, dim=-1).T
    sims = H.similarities(images, token, texts)
    zero = H.Fusion("zero", {"G": 1.0, "C": 0.0, "F_t2i": 0.0}, {"G": 1.0, "F_i2t": 0.0, "F_t2i": 0.0})
    for fusion in (H.Fusion.clip_only(), zero):
        for direction in ("t2i", "i2t"):
            assert torch.equal(H.fuse(sims, fusion, direction), clip)
    assert torch.equal(sims.C, clip)  # identity head: refined token = CLIP global


def test_fusions_follow_the_reference_formulas():
    imgs, txts = _side(5, seed=3), _side(8, seed=4)
    images, token = H.refine(H.IdentityHead(), imgs)
    texts, _ = H.refine(H.IdentityHead(), txts)
    s = H.similarities(images, token, texts)
    nrm = lambda m, dim: m / m.amax(dim=dim).mean().abs()
    G, C = nrm(s.G, 1), nrm(s.C, 1)
    Fi, Ft = nrm(s.E_i2t + s.R_i2t, 1), nrm(s.E_t2i + s.R_t2i, 0)
    assert torch.allclose(H.fuse(s, "released", "t2i"), 10 * G + Ft + C, atol=1e-5)
    assert torch.allclose(H.fuse(s, "released", "i2t"), 2 * G + 0.06 * C + 0.06 * Fi + 0.02 * Ft,
                          atol=1e-5)
    assert torch.allclose(H.fuse(s, "figure_mean", "t2i"), (s.C + s.E_t2i + s.R_t2i) / 3, atol=1e-6)
    assert torch.allclose(H.fuse(s, "figure_mean", "i2t"), (s.C + s.E_i2t + s.R_i2t) / 3, atol=1e-6)


def test_chunked_retrieval_matches_unchunked():
    imgs, txts = _side(9, seed=5), _side(18, seed=6)
    images, token = H.refine(H.IdentityHead(), imgs)
    texts, _ = H.refine(H.IdentityHead(), txts)
    t2i = torch.arange(18) // 2
    for fusion in ("released", "figure_mean", "clip"):
        full = H.chunked_retrieval(images, token, texts, t2i, fusion, image_chunk=100, text_chunk=100)
        small = H.chunked_retrieval(images, token, texts, t2i, fusion, image_chunk=4, text_chunk=5)
        assert full == small
    s = H.fuse(H.similarities(images, token, texts), "clip", "t2i")
    r1 = 100 * float((s.argmax(0) == t2i).float().mean())
    assert full["text_to_image"]["R@1"] == pytest.approx(r1)


# --- regions, views ---------------------------------------------------------------------------

def test_ranking_entities_by_confidence_and_pairs_by_product():
    r = comp.Regions(np.array([[0, 0, 2, 2], [0, 0, 8, 8], [1, 1, 3, 3]], np.float32),
                     np.array([0.5, 0.9, 0.7], np.float32))
    eb, em, rp, rm = comp.rank_components(r, 4, 4)
    assert eb[0].tolist() == [0, 0, 8, 8] and eb[1].tolist() == [1, 1, 3, 3]
    assert em.tolist() == [True, True, True, False]
    assert rp[:3].tolist() == [[0, 1], [0, 2], [1, 2]] and rm.tolist() == [True] * 3 + [False]


def test_views_mask_and_crop():
    img = torch.rand(3, 8, 8)
    eb = np.array([[0, 0, 4, 4], [4, 4, 8, 8]], np.float32)
    grey = torch.full((3,), -5.0)
    v = comp.component_views(img, eb, [True, True], np.array([[0, 1]]), [True], "mask", grey)
    assert v.shape == (3, 3, 8, 8)
    assert torch.equal(v[0, :, :4, :4], img[:, :4, :4]) and (v[0, :, 4:, :] == -5).all()
    assert torch.equal(v[2, :, 4:, 4:], img[:, 4:, 4:]) and (v[2, :, :4, 4:] == -5).all()
    c = comp.component_views(img, eb, [True, False], np.zeros((1, 2)), [False], "crop")
    assert c.shape == (1, 3, 8, 8)
    b = comp.map_boxes(np.array([[0, 0, 100, 50]]), (200, 100), 64)  # resize 0.64, crop x by 32
    assert b.tolist() == [[0, 0, 32, 32]]


def test_mask_regions_from_the_generated_dataset(world):
    paths = sorted((p for p in __import__("pathlib").Path(world["root"], "pairs", "images").rglob("*.png")))
    r = comp.MaskRegions()({"path": str(paths[0]), "size": (64, 64)})
    mask = np.load(str(paths[0]).replace(".png", "_mask.npy"))
    ys, xs = np.nonzero(mask)
    assert r.boxes.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    filled = comp.region_source("mask+grid")({"path": str(paths[0]), "size": (64, 64)})
    assert len(filled.boxes) == 10 and filled.scores[0] == 1.0 and (filled.scores[1:] < 1.0).all()


def test_boxes_and_coco_sources(tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"img1.jpg": [[0, 0, 5, 5, 0.3], [1, 1, 9, 9, 0.8]]}))
    r = comp.BoxesFileRegions(boxes)({"path": "/x/img1.jpg"})
    assert r.scores.tolist() == pytest.approx([0.3, 0.8])
    coco = tmp_path / "inst.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg", "width": 10, "height": 10}],
                                "annotations": [{"image_id": 7, "bbox": [0, 0, 2, 2]},
                                                {"image_id": 7, "bbox": [0, 0, 5, 4]}]}))
    r = comp.CocoRegions(coco)({"path": "/d/a.jpg"})
    assert r.boxes.tolist()[1] == [0, 0, 5, 4] and r.scores.tolist() == pytest.approx([0.04, 0.2])


# --- HDF5 cache ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from clipworld.generate import generate_world
    root = tmp_path_factory.mktemp("comalign_world")
    return generate_world(root, seed=0, image_size=64, per_class_domain=4,
                          compositional_per_class=2, pretrain_per_class_domain=4)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from pretraining.comalign_data import Encoder
    torch.manual_seed(0)
    cache = comp.ComponentCache(tmp_path_factory.mktemp("comalign_cache"))
    return Encoder("tiny-vit", "", regions="mask+grid", parser="rules", cache=cache)


def test_hdf5_cache_is_reused_without_a_second_encoder_pass(world, encoder):
    from pretraining.comalign_data import load_pairs
    pairs = load_pairs(f"world:{world['root']},split=val")
    calls = {"n": 0}
    original = encoder.clip.encode_image

    def counting(x, *a, **k):
        calls["n"] += 1
        return original(x, *a, **k)

    encoder.clip.encode_image = counting
    try:
        first = encoder.images("cache_test", pairs.images)
        n_first = calls["n"]
        second = encoder.images("cache_test", pairs.images)
    finally:
        encoder.clip.encode_image = original
    assert n_first > 0 and calls["n"] == n_first  # no second encoder pass
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first["entities"].shape[1:] == (10, 64) and first["entity_mask"][:, 0].all()
    path = encoder.cache.path(encoder._key("image", "cache_test", pairs.images,
                                           {"regions": encoder.source.describe(), "mode": "mask",
                                            "image_size": 64}))
    import h5py
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and set(f.keys()) >= {"global", "entities", "relation_mask"}


def test_half_written_cache_is_never_read_as_complete(tmp_path):
    import h5py
    cache = comp.ComponentCache(tmp_path)
    key = {"clip_model": "m", "side": "image", "data": {"name": "d"}}
    path = cache.path(key)
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as f:  # written without the final `complete` attribute
        f.create_dataset("global", data=np.zeros((2, 3)))
        f.attrs["key_digest"] = comp.digest(key)
    assert cache.load(key) is None
    path.write_bytes(b"\x89HDF\r\n truncated")
    with pytest.warns(UserWarning):
        assert cache.load(key) is None
    with pytest.raises(AttributeError):  # a crash while writing leaves no temporary behind
        cache.save(key, {"global": torch.zeros(2, 3), "bad": object()})
    assert not path.exists() or cache.load(key) is None
    assert not list(path.parent.glob(".*.tmp"))
    data = {"global": torch.ones(2, 3)}
    cache.save(key, data)
    assert torch.equal(cache.load(key)["global"], data["global"])
    assert cache.load({**key, "data": {"name": "other"}}) is None


# --- training and evaluation ------------------------------------------------------------------

def test_training_lowers_the_loss_resumes_and_eval_reports_clip_beside_comalign(world, encoder, tmp_path):
    from pretraining import comalign_eval, comalign_train
    out = tmp_path / "run"
    argv = ["--train", f"world:{world['root']},split=train", "--clip-model", "tiny-vit",
            "--clip-pretrained", "", "--out", str(out), "--epochs", "2", "--batch-size", "32",
            "--lr", "1e-3", "--device", "cpu", "--no-progress"]
    log = comalign_train.train(comalign_train.parse_args(argv), encoder)
    first, last = log["history"][0]["train_loss_eval"], log["history"][-1]["train_loss_eval"]
    assert last < first
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["format"] == H.HEAD_FORMAT
    # resume: one more epoch continues from the checkpoint
    argv[argv.index("--epochs") + 1] = "3"
    log = comalign_train.train(comalign_train.parse_args(argv), encoder)
    assert [h["epoch"] for h in log["history"]] == [-1, 0, 1, 2]
    args = comalign_eval.parse_args(["--checkpoint", str(out / "checkpoint.pt"), "--retrieval",
                                     f"world:{world['root']}", "--compositional",
                                     f"worldcomp:{world['root']}", "--out", str(out),
                                     "--device", "cpu", "--no-progress"])
    rec = comalign_eval.evaluate(args, encoder)
    rows = rec["retrieval"]["world_val"]
    assert {"CLIP", "ComAlign (released)", "ComAlign (figure_mean)"} <= set(rows)
    for row in ("CLIP", "ComAlign (released)"):
        assert set(rows[row]["text_to_image"]) == {"R@1", "R@5", "R@10"}
    print("\nheld-out generated pairs:", json.dumps({k: v for k, v in rows.items()
                                                     if isinstance(v, dict)}))
    comp_rows = rec["compositional"]["world_compositional"]
    assert set(comp_rows["CLIP"]) == {"replace_att", "replace_obj", "replace_rel", "average"}
    assert json.loads((out / "comalign_eval.json").read_text())["kind"] == "comalign_eval"

    # the collector kind turns the record into one table per benchmark
    from results.kind_comalign import ComAlignKind
    kind = ComAlignKind()
    tables = kind.tables(kind.load([out / "comalign_eval.json"]), [])
    names = {t.name for t in tables}
    assert {"comalign_retrieval_world_val", "comalign_compositional_world_compositional"} <= names
    assert any(r.label.startswith("CLIP ·") for t in tables for r in t.rows)

    # the registered method loads the trained head
    from algorithms.core import registry
    cls = registry.get_method("ComAlign")
    torch.manual_seed(0)
    m = cls(["circle", "square"], {**cls.default_hparams(), **TINY,
                                    "comalign_checkpoint": str(out / "checkpoint.pt")})
    assert m.trained_head and not m.has_trainable_parameters()
    assert m.predict(torch.randn(3, 3, 64, 64)).shape == (3, 2)


# --- the registered method ------------------------------------------------------------------------

def test_method_identity_clip_fusion_equals_zsclip_and_default_runs():
    from algorithms.core import registry
    from algorithms.zsclip import ZeroShotCLIP
    cls = registry.get_method("ComAlign")
    names = ["circle", "square", "star"]
    torch.manual_seed(0)
    z = ZeroShotCLIP(names, {**ZeroShotCLIP.default_hparams(), **TINY})
    torch.manual_seed(0)
    m = cls(names, {**cls.default_hparams(), **TINY, "fusion": "clip"})
    x = torch.randn(4, 3, 64, 64)
    assert torch.equal(m.predict(x), z.predict(x))
    torch.manual_seed(0)
    d = cls(names, {**cls.default_hparams(), **TINY})
    assert d.trains is False and not d.has_trainable_parameters()
    logits = d.predict(x)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    assert torch.allclose(d.predict(x[:2]), logits[:2], atol=1e-4)  # batch-independent
    assert d.state_dict() == {} or all(not k.startswith("clip.") for k in d.state_dict())
