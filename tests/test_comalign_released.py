"""ComAlign's released files (algorithms/comalign/released.py): the released head's state
dict loads into the harness's head with the released module's outputs (a re-implementation
of inference.py's RetrievalModel written here from its description), damaged files are
refused in one line, the HDF5 readers read files written here in the released layout, and
`python -m algorithms.comalign.evaluate --released-embeddings ...` gives inference.py's
R@1/5/10/50 on a generated world (computed here the way inference.py computes them)."""
import json
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

from algorithms.comalign import evaluate as comalign_eval
from algorithms.comalign import released as R
from algorithms.comalign.head import IdentityHead, load_head_checkpoint
from common.readers import DataError
from tests.conftest import TINY, needs_domainbed

h5py = pytest.importorskip("h5py")

D = 64  # tiny-vit's embed dim; the released layout is RetrievalModel(hidden_dim)


# --- inference.py's RetrievalModel, as its code describes it (not imported) -------------------

class TheirPositions(nn.Module):
    def __init__(self, length, dim):
        super().__init__()
        pos = torch.arange(length).view(-1, 1)
        j = torch.arange(dim).view(1, -1)
        angles = pos / (10000 ** ((2 * j) / dim))
        enc = torch.zeros(1, length, dim)
        enc[0, :, ::2] = torch.cos(angles[:, ::2])
        enc[0, :, 1::2] = torch.sin(angles[:, 1::2])
        self.register_buffer("positional_encodings", enc)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(x + self.positional_encodings)


class TheirRetrievalModel(nn.Module):
    def __init__(self, hidden_dim):
        super().__init__()
        self.encoder_pos_embedding = TheirPositions(21, hidden_dim)
        layer = nn.TransformerEncoderLayer(d_model=hidden_dim, nhead=4, batch_first=True,
                                           dim_feedforward=hidden_dim)
        self.transformer_encoder_box = nn.TransformerEncoder(layer, num_layers=2)
        self.bottleneck_box = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.bottleneck_encoder = nn.Sequential(nn.Linear(hidden_dim, 256), nn.ReLU())

    def forward(self, boxes, images):
        boxes = torch.cat((boxes[:, 0:20, :], images.unsqueeze(dim=1)), dim=1)
        out = self.transformer_encoder_box(self.encoder_pos_embedding(self.bottleneck_box(boxes)))
        return out[:, :20, :], out[:, -1, :]


def their_model(dim, seed=0) -> TheirRetrievalModel:
    """Random weights everywhere (layer norms and the position buffer too, so that a
    mapping that dropped or swapped any tensor would show)."""
    torch.manual_seed(seed)
    model = TheirRetrievalModel(dim)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
        model.encoder_pos_embedding.positional_encodings.add_(
            0.1 * torch.randn_like(model.encoder_pos_embedding.positional_encodings))
    return model.eval()


@pytest.fixture(scope="module")
def released_ckpt(tmp_path_factory):
    model = their_model(D)
    path = tmp_path_factory.mktemp("released_head") / "ComAlign-CLIP-VIT-B32.pt"
    torch.save(model.state_dict(), path)  # the released file: the plain state dict
    return model, path


# --- the released head -----------------------------------------------------------------------

@pytest.mark.parametrize("dim", [D, 512])
def test_released_head_gives_the_released_modules_outputs(dim, tmp_path):
    model = their_model(dim, seed=dim)
    path = tmp_path / "head.pt"
    torch.save(model.state_dict(), path)
    image_head, text_head, info = load_head_checkpoint(str(path))
    assert isinstance(text_head, IdentityHead) and info["format"] == R.RELEASED_FORMAT
    assert image_head.config.dim == dim and image_head.config.feedforward == dim
    assert not image_head.config.padding_mask and not image_head.training
    torch.manual_seed(1)
    boxes, images = torch.randn(3, 20, dim), torch.randn(3, dim)
    boxes[0, 7:10] = 0.0  # zero-padded slots, fed unmasked as inference.py does
    masks = torch.ones(3, 10, dtype=torch.bool)
    masks[0, 7:] = False  # ignored: the released head has no padding mask
    with torch.no_grad():
        their_components, their_global = model(boxes, images)
        ent, rel, glob = image_head(boxes[:, :10], boxes[:, 10:], images, masks, masks)
    assert torch.allclose(torch.cat([ent, rel], 1), their_components, atol=1e-5)
    assert torch.allclose(glob, their_global, atol=1e-5)
    assert not torch.allclose(glob, images, atol=1e-2)  # the head did something


def test_released_head_without_the_unused_bottleneck_encoder_loads(tmp_path):
    state = their_model(D).state_dict()
    for k in [k for k in state if k.startswith("bottleneck_encoder.")]:
        del state[k]
    torch.save(state, tmp_path / "head.pt")
    assert load_head_checkpoint(str(tmp_path / "head.pt"))[0].config.dim == D


def _damaged(tmp_path, change):
    state = dict(their_model(D).state_dict())
    change(state)
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as e:
        load_head_checkpoint(str(path))
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_damaged_released_heads_are_refused_naming_the_first_bad_key(tmp_path):
    key = "transformer_encoder_box.layers.1.norm2.bias"
    assert _damaged(tmp_path, lambda s: s.pop(key)).endswith(f"missing {key}")
    key = "transformer_encoder_box.layers.0.linear1.weight"
    message = _damaged(tmp_path, lambda s: s.__setitem__(key, torch.zeros(2 * D, D)))
    assert f"{key} has shape [{2 * D}, {D}], expected [{D}, {D}]" in message
    message = _damaged(tmp_path, lambda s: s.__setitem__(R.POSITIONS_KEY, torch.zeros(1, 11, D)))
    assert f"{R.POSITIONS_KEY} has shape [1, 11, {D}]" in message
    extra = "transformer_encoder_box.layers.2.linear1.weight"
    assert _damaged(tmp_path, lambda s: s.__setitem__(extra, torch.zeros(D, D))).endswith(
        f"unexpected key {extra}")
    message = _damaged(tmp_path, lambda s: s.pop(R.POSITIONS_KEY))
    assert message.endswith(f"missing {R.POSITIONS_KEY}")


class _Touch:
    """Pickled as a call that creates `path`: what an unsafe loader would execute."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_pickled_code_in_a_released_layout_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    state = dict(their_model(D).state_dict())
    state["bottleneck_encoder.0.weight"] = _Touch(marker)
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="cannot read as a ComAlign head checkpoint"):
        load_head_checkpoint(str(path))
    assert not marker.exists()


def test_the_method_takes_the_released_head(released_ckpt, tiny_weights, capsys):
    from algorithms.core import registry
    cls = registry.get_method("ComAlign")
    hp = {**TINY, "clip_pretrained": tiny_weights}
    names = ["circle", "square", "star"]
    identity = cls.create(names, hp)
    with_head = cls.create(names, {**hp, "comalign_checkpoint": str(released_ckpt[1])})
    assert f"ComAlign: released head {released_ckpt[1]}" in capsys.readouterr().out
    assert with_head.trained_head and not with_head.image_head.config.padding_mask
    x = torch.randn(2, 3, 64, 64)
    logits = with_head.predict(x)
    assert torch.isfinite(logits).all() and not torch.allclose(logits, identity.predict(x))


# --- the released embeddings ---------------------------------------------------------------

def write_h5(path, datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=np.asarray(value, dtype=np.float32))


def released_world(root, dim=D, seed=0, phrases=(4, 3)):
    """COCO-like val set in the released layout: images/<id:012d>.jpg, captions JSON
    (annotations shuffled, one image with 6 captions), the four HDF5 files (text rows with
    zero-padded phrases)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    ids = [139, 285, 632, 724, 776, 785]
    images = root / "val2017"
    images.mkdir(parents=True)
    for i in ids:
        pixels = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:012d}.jpg")
    words = ["a red circle", "a dog on a bench", "two cats", "a blue star", "a man with a bat",
             "a plate of food", "a bus", "the kitchen sink"]
    annotations = [{"image_id": i, "id": 1000 * k + i, "caption": f"{words[(k + n) % 8]} {k}"}
                   for n, i in enumerate(ids) for k in range(6 if i == 632 else 5)]
    order = rng.permutation(len(annotations))
    annotations = [annotations[j] for j in order]
    captions_json = root / "captions_val2017.json"
    captions_json.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids],
        "annotations": annotations}))
    emb = root / "embeddings"
    emb.mkdir()
    count = {i: (6 if i == 632 else 5) for i in ids}

    def text(p):
        out = {}
        for i in ids:
            t = rng.standard_normal((count[i], 1, p, dim))
            t[:, :, p - 1] = 0.0  # a padded phrase slot
            out[str(i)] = t
        return out
    image_ent = {str(i): rng.standard_normal((10, dim)) for i in ids}
    image_rel = {str(i): rng.standard_normal((10, dim)) for i in ids}
    image_ent[str(ids[1])][8:] = 0.0  # fewer detections than slots
    write_h5(emb / "val2017_noun_yolo_emb_ViT-B-32_openai.h5", image_ent)
    write_h5(emb / "val2017_rel_yolo_emb_ViT-B-32_openai.h5", image_rel)
    write_h5(emb / "val2017_att_sentence_ViT-B-32_openai_sep.h5", text(phrases[0]))
    write_h5(emb / "val2017_relation_sentence_ViT-B-32_openai_sep.h5", text(phrases[1]))
    first_seen = list(dict.fromkeys(a["image_id"] for a in annotations))
    return {"root": root, "images": images, "captions": captions_json, "embeddings": emb,
            "ids": first_seen, "annotations": annotations}


def test_readers_pair_the_released_files_as_inference_py(tmp_path):
    w = released_world(tmp_path)
    files = R.find_released_files(tmp_path)  # the folder above embeddings/ works too
    assert files == R.find_released_files(w["embeddings"])
    assert files["text_entities"].name == "val2017_att_sentence_ViT-B-32_openai_sep.h5"
    ids, by_id = R.read_captions_as_released(w["captions"])
    assert ids == w["ids"] and len(by_id[632]) == 6
    assert by_id[632] == [a["caption"] for a in w["annotations"] if a["image_id"] == 632]
    ent = R.read_image_components(files["image_entities"], ids)
    with h5py.File(files["image_entities"]) as f:
        assert torch.equal(ent[2], torch.from_numpy(f[str(ids[2])][()]))
    assert ent.shape == (6, 10, D)
    text = R.read_text_components(files["text_relations"], ids)
    assert text.shape == (30, 3, D)
    k = ids.index(632)
    with h5py.File(files["text_relations"]) as f:
        rows = f["632"][()]
    assert rows.shape == (6, 1, 3, D)
    assert torch.equal(text[5 * k:5 * k + 5], torch.from_numpy(rows[:5, 0]))  # first 5 rows


def test_readers_refuse_what_inference_py_could_not_read(tmp_path):
    w = released_world(tmp_path)
    files = R.find_released_files(w["embeddings"])
    with pytest.raises(DataError, match=r"no dataset '999'"):
        R.read_image_components(files["image_relations"], [139, 999])
    write_h5(tmp_path / "bad_noun_yolo_emb.h5", {"139": np.zeros((10, 3, D))})
    with pytest.raises(DataError, match=r"'139' has shape \[10, 3, 64\], expected \[10, D\]"):
        R.read_image_components(tmp_path / "bad_noun_yolo_emb.h5", [139])
    write_h5(tmp_path / "few_att_sentence_sep.h5", {"139": np.zeros((4, 1, 2, D))})
    with pytest.raises(DataError, match=r"'139' has shape \[4, 1, 2, 64\], expected \[>= 5"):
        R.read_text_components(tmp_path / "few_att_sentence_sep.h5", [139])
    (w["embeddings"] / "val2017_noun_yolo_emb_copy.h5").write_bytes(b"")
    with pytest.raises(DataError, match=r"expected one file \*_noun_yolo_emb\*\.h5.*found 2"):
        R.find_released_files(w["embeddings"])
    with pytest.raises(DataError, match="cannot read as HDF5"):
        R.read_image_components(w["embeddings"] / "val2017_noun_yolo_emb_copy.h5", [139])


# --- the end-to-end command --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from algorithms import backbone
    torch.manual_seed(3)
    clip, _ = backbone.load_clip("tiny-vit", None)
    path = tmp_path_factory.mktemp("tiny_clip") / "tiny-vit.pt"
    torch.save(clip.state_dict(), path)
    return str(path)


def inference_py_scores(w, model, weights):
    """inference.py's computation, written out here: CLIP globals (open_clip's own
    preprocessing), the released forward, eps-normalisation, MaxSim over every slot, its
    normalisers and weights. (text-to-image scores [T, I], image-to-text [I, T], caption ->
    image)."""
    import open_clip
    from PIL import Image

    from algorithms import backbone
    clip, tokenizer = backbone.load_clip("tiny-vit", weights)
    preprocess = open_clip.image_transform(64, is_train=False)
    ids, by_id = R.read_captions_as_released(w["captions"])

    def read(name, image_id):
        with h5py.File(w["embeddings"] / name, "r") as f:
            return torch.from_numpy(f[str(image_id)][()]).float()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(w["images"] / f"{i:012d}.jpg")) for i in ids])
        image_enc = clip.encode_image(pixels).float()
        boxes = torch.stack([torch.cat([read("val2017_noun_yolo_emb_ViT-B-32_openai.h5", i),
                                        read("val2017_rel_yolo_emb_ViT-B-32_openai.h5", i)])
                             for i in ids])
        encoded, image_cls = model(boxes, image_enc)
        text_enc = clip.encode_text(tokenizer([c for i in ids for c in by_id[i][:5]])).float()
    img_noun, img_rel = encoded[:, :10], encoded[:, 10:]
    txt_noun = torch.cat([read("val2017_att_sentence_ViT-B-32_openai_sep.h5", i)[:5, 0]
                          for i in ids])
    txt_rel = torch.cat([read("val2017_relation_sentence_ViT-B-32_openai_sep.h5", i)[:5, 0]
                         for i in ids])
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    eps_unit = lambda x: x / (x.norm(dim=-1, keepdim=True) + 1e-8)
    image_enc, image_cls, text_enc = unit(image_enc), unit(image_cls), unit(text_enc)
    img_noun, img_rel, txt_noun, txt_rel = map(eps_unit, (img_noun, img_rel, txt_noun, txt_rel))

    def chamfer(a, b):
        cross = torch.einsum("ipd,tkd->itpk", a, b)
        return cross.max(-1).values.mean(-1), cross.max(-2).values.mean(-1).T

    ni2t, nt2i = chamfer(img_noun, txt_noun)
    ri2t, rt2i = chamfer(img_rel, txt_rel)
    s_i2t, s_t2i = ni2t + ri2t, nt2i + rt2i              # [I, T], [T, I]
    coarse, coarse_cls = image_enc @ text_enc.T, image_cls @ text_enc.T
    norm = lambda m: m / torch.mean(torch.max(m, dim=-1)[0], dim=-1).abs()
    s_i2t, s_t2i = norm(s_i2t), norm(s_t2i)
    coarse = coarse / torch.mean(torch.max(coarse, dim=1)[0]).abs()
    coarse_cls = coarse_cls / torch.mean(torch.max(coarse_cls, dim=1)[0]).abs()
    t2i_map = torch.arange(len(ids)).repeat_interleave(5)
    return (10 * coarse.T + s_t2i + coarse_cls.T,
            0.06 * coarse_cls + 0.06 * s_i2t + 2 * coarse + 0.02 * s_t2i.T, t2i_map)


def inference_py_recalls(w, model, weights):
    """inference.py's recalls: argsort of its scores, R@1/5/10/50 as fractions."""
    t2i_scores, i2t_scores, t2i_map = inference_py_scores(w, model, weights)
    inds = torch.argsort(t2i_scores, dim=1, descending=True)
    t2i = [torch.eq(inds[:, :k], t2i_map[:, None]).any(1).sum().item() / len(t2i_map)
           for k in (1, 5, 10, 50)]
    inds = torch.argsort(i2t_scores, dim=1, descending=True)
    n = len(i2t_scores)
    i2t = [(t2i_map[inds[:, :k]] == torch.arange(n)[:, None]).any(1).sum().item() / n
           for k in (1, 5, 10, 50)]
    return i2t, t2i


def test_released_scores_equal_inference_py_s(tmp_path, released_ckpt, tiny_weights):
    """Every term (head, unmasked MaxSim over padded slots, normalisers, weights): the
    fused matrices themselves, not only the recalls."""
    from algorithms.comalign.data import Encoder
    from algorithms.comalign.head import fuse, similarities
    w = released_world(tmp_path / "world")
    model, ckpt = released_ckpt
    encoder = Encoder("tiny-vit", tiny_weights, parser="rules", cache=None)
    data = R.load_released_set(w["embeddings"], w["captions"], w["images"], encoder)
    assert data["image_ids"] == w["ids"]
    head = load_head_checkpoint(str(ckpt))[0]
    images, token = comalign_eval.refine_all(head, data["images"], "cpu")
    texts, _ = comalign_eval.refine_all(IdentityHead(), data["texts"], "cpu")
    sims = similarities(images, token, texts)
    t2i, i2t, t2i_map = inference_py_scores(w, model, tiny_weights)
    assert torch.equal(data["caption_image"], t2i_map)
    assert torch.allclose(fuse(sims, "released", "t2i").T, t2i, atol=1e-5)
    assert torch.allclose(fuse(sims, "released", "i2t"), i2t, atol=1e-5)


def test_released_command_reproduces_inference_py(tmp_path, released_ckpt, tiny_weights, capsys):
    from common.run_facts import file_digest
    w = released_world(tmp_path / "world")
    model, ckpt = released_ckpt
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(ckpt), "--released-embeddings", str(w["embeddings"]),
            "--captions", str(w["captions"]), "--images", str(w["images"]),
            "--clip-model", "tiny-vit", "--clip-pretrained", tiny_weights, "--parser", "rules",
            "--fusion", "released", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert comalign_eval.main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "comalign_eval.json").read_text())
    assert record["head"] == "released"
    assert record["run"]["weights_digest"] == file_digest(str(ckpt))
    result = record["retrieval"][R.RELEASED_SET]
    assert (result["num_images"], result["num_captions"]) == (6, 30)
    ours = result["ComAlign (released)"]
    i2t, t2i = inference_py_recalls(w, model, tiny_weights)
    for k, a, b in zip((1, 5, 10, 50), i2t, t2i):
        assert ours["image_to_text"][f"R@{k}"] == pytest.approx(100 * a, abs=1e-4)
        assert ours["text_to_image"][f"R@{k}"] == pytest.approx(100 * b, abs=1e-4)
    # by hand: 6 images, so every caption finds its image within 10; 30 captions < 50
    assert t2i[2] == t2i[3] == 1.0 and i2t[3] == 1.0
    assert 0.0 < t2i[0] < 1.0  # the ranking decides R@1: not a degenerate world
    lines = {line.split(": ")[0]: json.loads(line.split(": ", 1)[1])
             for line in printed.splitlines() if line.endswith("]") and "recall: [" in line}
    assert lines["image to text recall"] == pytest.approx(i2t, abs=1e-6)
    assert lines["text to image recall"] == pytest.approx(t2i, abs=1e-6)
    assert set(result["CLIP"]["image_to_text"]) == {"R@1", "R@5", "R@10", "R@50"}


def test_released_command_needs_its_three_paths(tmp_path):
    from common.cli import InputError
    with pytest.raises(InputError, match="go together"):
        comalign_eval.evaluate(comalign_eval.parse_args(
            ["--released-embeddings", str(tmp_path), "--out", str(tmp_path)]))


@needs_domainbed
def test_domainbed_job_classifies_with_the_released_head(released_ckpt, tiny_weights, tmp_path):
    from clipworld.generate import generate_world
    from tests.conftest import PY, run
    world = generate_world(tmp_path / "world", seed=0, image_size=64, per_class_domain=2,
                           compositional_per_class=0, pretrain_per_class_domain=0)
    hp = {**TINY, "clip_pretrained": tiny_weights, "batch_size": 4,
          "comalign_checkpoint": str(released_ckpt[1])}
    result = run([PY, "-m", "domainbed.scripts.train", "--algorithm", "ComAlign", "--dataset",
                  "CLIPWorld", "--data_dir", world["domainbed_root"], "--test_envs", "0",
                  "--steps", "1", "--output_dir", str(tmp_path / "job"), "--hparams",
                  json.dumps(hp)], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"ComAlign: released head {released_ckpt[1]}" in result.stdout
    record = json.loads((tmp_path / "job" / "results.jsonl").read_text().splitlines()[-1])
    assert record["hparams"]["comalign_checkpoint"] == str(released_ckpt[1])
    assert all(0.0 <= record[f"env{e}_out_acc"] <= 1.0 for e in range(4))
