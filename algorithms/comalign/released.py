"""ComAlign's released files, read as released (aliabdollahi024/ComAlign `inference.py` and
README; user documentation: docs/comalign.md, "The released head and embeddings").

Head (`ComAlign-CLIP-VIT-B32.pt`): the plain state dict of `RetrievalModel(hidden_dim)`
(D = hidden_dim, 512 for the release):
    encoder_pos_embedding.positional_encodings [1, 21, D]   sinusoidal buffer (used as stored)
    bottleneck_box.0.{weight [D, D], bias [D]}               Linear + ReLU on all 21 tokens
    transformer_encoder_box.layers.{0,1}.*                  nn.TransformerEncoderLayer(D, 4
        heads, feed-forward D, dropout 0.1, relu, post-norm, batch_first), no final norm
    bottleneck_encoder.0.*                                  never called in forward: ignored
Forward: [20 components (10 nouns, 10 relations), CLIP image embedding] -> bottleneck ->
+ positions -> encoder, no padding mask -> (tokens 0..19, token 20). It maps onto the
harness's ComAlignHead with HeadConfig(dim=D, feedforward=D, padding_mask=False)
(`released_head`); `head.load_head_checkpoint` accepts either layout.

Embeddings (`embeddings.zip`, four HDF5 files, one dataset per COCO image id, named
str(image_id)):
    *_noun_yolo_emb*.h5          image entities    [10, D]
    *_rel_yolo_emb*.h5           image relations   [10, D]
    *_att_sentence*_sep.h5       caption entities  [captions, 1, phrases, D]
    *_relation_sentence*_sep.h5  caption relations [captions, 1, phrases, D]
(`[captions, phrases, D]` is read too: inference.py squeezes dim 1). Pairing as
inference.py's: image ids in order of first appearance among captions_val2017.json's
annotations, each image's first 5 captions in annotation order, text rows 0..4 of its
datasets; the image file is `<images>/<id:012d>.jpg`. The global embeddings are not in
the files: CLIP's image embedding (open_clip preprocessing) and text embedding of each
caption, computed here as inference.py does (cached in the feature cache).

Scoring (`released_retrieval`): every slot is used as inference.py uses it (no masks:
zero-padded slots go through the head and count in MaxSim's max and mean), components and
globals L2-normalised, the "released" fusion (head.py), R@1/5/10/50 both ways. The one
difference: ties count against the query (common/retrieval.py), where inference.py keeps
torch.argsort's order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import torch

from algorithms.comalign.head import ComAlignHead, HeadConfig
from common.cli import InputError
from common.readers import DataError, need_dir, read_json

RELEASED_FORMAT = "comalign-released"  # the tag load_head_checkpoint returns for these
POSITIONS_KEY = "encoder_pos_embedding.positional_encodings"
UNUSED_PREFIX = "bottleneck_encoder."
SEQUENCE = 21          # 20 components + the global token
RELEASED_LAYERS = 2
RELEASED_HEADS = 4
# the harness's key prefix -> the released one
RENAMES = (("bottleneck.", "bottleneck_box."), ("positions.encodings", POSITIONS_KEY),
           ("encoder.layers.", "transformer_encoder_box.layers."))
RELEASED_PREFIXES = ("encoder_pos_embedding.", "bottleneck_box.", "transformer_encoder_box.",
                     UNUSED_PREFIX)

RELEASED_SET = "coco_val2017_released"
CAPTIONS_PER_IMAGE = 5
COMPONENTS = 10        # image slots per kind
RECALL_KS = (1, 5, 10, 50)
FILE_PATTERNS = {"image_entities": "*_noun_yolo_emb*.h5",
                 "image_relations": "*_rel_yolo_emb*.h5",
                 "text_entities": "*_att_sentence*_sep.h5",
                 "text_relations": "*_relation_sentence*_sep.h5"}


# --- the released head ------------------------------------------------------------------

def is_released_layout(state) -> bool:
    return isinstance(state, dict) and "format" not in state and \
        any(isinstance(k, str) and k.startswith(RELEASED_PREFIXES) for k in state)


def released_key(harness_key: str) -> str:
    for ours, theirs in RENAMES:
        if harness_key.startswith(ours):
            return theirs + harness_key[len(ours):]
    raise KeyError(harness_key)


def released_head(state: Dict[str, torch.Tensor], path, device="cpu") -> Tuple[ComAlignHead, dict]:
    """(ComAlignHead with the released weights, eval mode; info) from RetrievalModel's state
    dict. Strict: every used tensor present with its shape, nothing unknown; the first bad
    key is named in a one-line InputError."""
    def bad(what):
        return InputError(f"{path}: not ComAlign's released RetrievalModel state dict: {what}")

    positions = state.get(POSITIONS_KEY)
    if not isinstance(positions, torch.Tensor):
        raise bad(f"missing {POSITIONS_KEY}")
    if positions.dim() != 3 or positions.shape[:2] != (1, SEQUENCE):
        raise bad(f"{POSITIONS_KEY} has shape {list(positions.shape)}, expected "
                  f"[1, {SEQUENCE}, hidden_dim]")
    dim = int(positions.shape[2])
    if dim % RELEASED_HEADS:
        raise bad(f"hidden_dim {dim} is not divisible by {RELEASED_HEADS} heads")
    config = HeadConfig(dim=dim, num_entities=COMPONENTS, num_relations=SEQUENCE - 1 - COMPONENTS,
                        heads=RELEASED_HEADS, feedforward=dim, layers=RELEASED_LAYERS,
                        dropout=0.1, padding_mask=False)
    head = ComAlignHead(config)
    mapped = {}
    for ours, expected in head.state_dict().items():
        theirs = released_key(ours)
        value = state.get(theirs)
        if value is None:
            raise bad(f"missing {theirs}")
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(expected.shape):
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise bad(f"{theirs} has shape {shape}, expected {list(expected.shape)} "
                      f"(hidden_dim {dim})")
        mapped[ours] = value
    used = {released_key(k) for k in mapped}
    for key in state:
        if key not in used and not str(key).startswith(UNUSED_PREFIX):
            raise bad(f"unexpected key {key}")
    head.load_state_dict(mapped)
    info = {"format": RELEASED_FORMAT, "head_config": config.as_dict(),
            "meta": {"source": "released RetrievalModel"}}
    return head.to(device).eval(), info


# --- the released embeddings --------------------------------------------------------------

def find_released_files(folder) -> Dict[str, Path]:
    """The four HDF5 files in `folder` (or its `embeddings/`, as embeddings.zip unpacks)."""
    root = need_dir(folder, "ComAlign's released embeddings")
    if not any(root.glob("*.h5")) and (root / "embeddings").is_dir():
        root = root / "embeddings"
    found = {}
    for part, pattern in FILE_PATTERNS.items():
        matches = sorted(root.glob(pattern))
        if len(matches) != 1:
            have = ", ".join(sorted(p.name for p in root.glob("*.h5"))) or "no .h5 files"
            raise DataError(f"{root}: expected one file {pattern} (ComAlign's embeddings.zip), "
                            f"found {len(matches)}; there: {have}")
        found[part] = matches[0]
    return found


def read_captions_as_released(path) -> Tuple[List[int], Dict[int, List[str]]]:
    """(image ids in order of first appearance, each id's captions in annotation order) of a
    COCO captions JSON, as inference.py's CocoDetection reads it."""
    data = read_json(path, "COCO captions JSON")
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise DataError(f"{path}: not COCO captions (needs a list 'annotations')")
    ids, captions = [], {}
    for n, a in enumerate(annotations):
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), int) \
                or not isinstance(a.get("caption"), str):
            raise DataError(f"{path}: annotation {n} needs an integer 'image_id' and a string "
                            f"'caption'")
        if a["image_id"] not in captions:
            ids.append(a["image_id"])
            captions[a["image_id"]] = []
        captions[a["image_id"]].append(a["caption"])
    if not ids:
        raise DataError(f"{path}: no captions")
    return ids, captions


def _dataset(f, path, image_id):
    key = str(image_id)
    if key not in f:
        raise DataError(f"{path}: no dataset {key!r} (image id from the captions JSON)")
    return torch.from_numpy(f[key][()]).float()


def read_image_components(path, image_ids) -> torch.Tensor:
    """[images, 10, D] from a released image-side file (`*_noun_yolo_emb*` / `*_rel_yolo_emb*`)."""
    rows, dim = [], None
    with _open_h5(path) as f:
        for image_id in image_ids:
            x = _dataset(f, path, image_id)
            dim = dim or (x.shape[-1] if x.dim() == 2 else None)
            if x.dim() != 2 or x.shape != (COMPONENTS, dim):
                raise DataError(f"{path}: dataset {str(image_id)!r} has shape {list(x.shape)}, "
                                f"expected [{COMPONENTS}, {dim or 'D'}]")
            rows.append(x)
    return torch.stack(rows)


def read_text_components(path, image_ids, per_image=CAPTIONS_PER_IMAGE) -> torch.Tensor:
    """[images * per_image, phrases, D] from a released caption-side file
    (`*_att_sentence*_sep` / `*_relation_sentence*_sep`): each image's first `per_image`
    caption rows, in order."""
    rows, shape = [], None
    with _open_h5(path) as f:
        for image_id in image_ids:
            x = _dataset(f, path, image_id)
            if x.dim() == 4 and x.shape[1] == 1:
                x = x[:, 0]
            if x.dim() != 3 or x.shape[0] < per_image or (shape and x.shape[1:] != shape):
                want = f"[>= {per_image}, 1, {shape[0] if shape else 'phrases'}, " \
                       f"{shape[1] if shape else 'D'}]"
                raise DataError(f"{path}: dataset {str(image_id)!r} has shape "
                                f"{list(f[str(image_id)].shape)}, expected {want}")
            shape = x.shape[1:]
            rows.append(x[:per_image])
    return torch.cat(rows)


def _open_h5(path):
    import h5py
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: cannot read as HDF5 ({e})") from None


def image_file(images_dir, image_id) -> Path:
    return Path(images_dir) / f"{image_id:012d}.jpg"


# --- global CLIP embeddings, as inference.py computes them ----------------------------------

@torch.no_grad()
def clip_globals(encoder, image_ids, captions: List[str], images_dir, batch_size=100):
    """{"image": [images, D], "text": [captions, D]}: CLIP's (unnormalised) embeddings of the
    image files and the captions, fp32; cached under the feature cache."""
    from algorithms.core.feature_cache import FeatureCache
    from algorithms.comalign.cache import items_fingerprint
    files = [str(image_file(images_dir, i)) for i in image_ids]
    key = {"format": "comalign-released-globals-v1", "clip_model": encoder.clip_model,
           "weights": encoder.weights, "image_size": encoder.image_size,
           "data": {"dataset": "comalign_released", "split": "globals",
                    "images": items_fingerprint(files), "captions": items_fingerprint(captions)}}

    def compute():
        from PIL import Image

        from common import cli
        device = encoder.device
        image_parts, text_parts = [], []
        for s in range(0, len(files), batch_size):
            batch = []
            for path in files[s:s + batch_size]:
                try:
                    with Image.open(path) as im:  # preprocess converts to RGB itself, as theirs
                        batch.append(encoder.transform(im))
                except (OSError, ValueError) as e:
                    raise DataError(f"{path}: cannot read image "
                                    f"({cli.image_problem(path, e)})") from None
            pixels = torch.stack(batch).to(device)
            image_parts.append(encoder.clip.encode_image(pixels).float().cpu())
        for s in range(0, len(captions), batch_size * CAPTIONS_PER_IMAGE):
            tokens = encoder.tokenizer(captions[s:s + batch_size * CAPTIONS_PER_IMAGE]).to(device)
            text_parts.append(encoder.clip.encode_text(tokens).float().cpu())
        return {"image": torch.cat(image_parts), "text": torch.cat(text_parts)}

    cache = FeatureCache.from_env("comalign_released")
    return compute() if cache is None else cache.get_or_compute(key, compute, "CLIP globals")


# --- retrieval as inference.py scores it ----------------------------------------------------

def load_released_set(folder, captions_json, images_dir, encoder) -> dict:
    """Image and caption Sides' tensors (evaluate.refine_all's input, every slot valid) and
    caption -> image, paired as inference.py pairs them."""
    files = find_released_files(folder)
    need_dir(images_dir, "COCO val2017 images")
    ids, by_id = read_captions_as_released(captions_json)
    short = [i for i in ids if len(by_id[i]) < CAPTIONS_PER_IMAGE]
    if short:
        raise DataError(f"{captions_json}: image {short[0]} has {len(by_id[short[0]])} captions; "
                        f"the released protocol uses {CAPTIONS_PER_IMAGE} per image")
    captions = [c for i in ids for c in by_id[i][:CAPTIONS_PER_IMAGE]]
    globals_ = clip_globals(encoder, ids, captions, images_dir)
    image_ent = read_image_components(files["image_entities"], ids)
    image_rel = read_image_components(files["image_relations"], ids)
    text_ent = read_text_components(files["text_entities"], ids)
    text_rel = read_text_components(files["text_relations"], ids)
    dims = {image_ent.shape[-1], image_rel.shape[-1], text_ent.shape[-1], text_rel.shape[-1],
            globals_["image"].shape[-1]}
    if len(dims) != 1:
        raise DataError(f"{folder}: embedding widths differ ({sorted(dims)}): files and CLIP "
                        f"{encoder.clip_model} must be of one model (the release: ViT-B-32 openai)")
    every = lambda x: torch.ones(x.shape[:2], dtype=torch.bool)
    images = {"global": globals_["image"], "entities": image_ent, "entity_mask": every(image_ent),
              "relations": image_rel, "relation_mask": every(image_rel)}
    texts = {"global": globals_["text"], "entities": text_ent, "entity_mask": every(text_ent),
             "relations": text_rel, "relation_mask": every(text_rel)}
    caption_image = torch.arange(len(ids)).repeat_interleave(CAPTIONS_PER_IMAGE)
    return {"images": images, "texts": texts, "caption_image": caption_image,
            "image_ids": ids, "files": {k: str(v) for k, v in files.items()}}


def as_released_print(recalls: Dict[str, Dict[str, float]]) -> str:
    """inference.py's two lines (fractions, R@1/5/10/50)."""
    frac = lambda d: [round(d[f"R@{k}"] / 100.0, 6) for k in RECALL_KS]
    return (f"image to text recall: {frac(recalls['image_to_text'])}\n"
            f"text to image recall: {frac(recalls['text_to_image'])}")
