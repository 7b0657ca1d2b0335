"""Modality-gap measures of paired image and text embeddings, and a 2-D projection figure.

Inputs: I, T in R^{N x d}, row i of each is one image-caption pair. Every measure first
L2-normalises the rows (x / ||x||), so all of them are on the unit sphere.

- centroid_distance = || mean_i I_i - mean_i T_i ||_2: the gap vector's length between the
  two modalities' centroids (Liang et al., "Mind the Gap", NeurIPS 2022, their Delta_gap).
- alignment_score = mean_i cos(I_i, T_i): the mean of the diagonal of the cross-modal cosine
  matrix C = I T^T (Eslami & de Melo, "Mitigate the Gap", ICLR 2025; the authors' notebook
  sarahESL/open_clip `src/alignment_separation_scores.ipynb`).
- separation_score = 1 - mean(C with its diagonal set to 0), the mean taken over all N^2
  entries (diagonal zeros included), as in the same notebook.
- uniformity(X) = log mean_{i<j} exp(-2 ||X_i - X_j||^2) over distinct pairs of one
  modality (Wang & Isola, ICML 2020, `lunif` with t = 2; lower = more uniform).
- mean_unpaired_cosine = mean_{i != j} C_ij, the off-diagonal mean (for reading the
  separation score, which mixes in the diagonal's N zeros).

`projection_figure` draws a PCA (sklearn) of both modalities' normalised embeddings fitted
together, images and texts in two colours, optionally lines between the first pairs; one
panel per model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _unit(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be N x d, got shape {tuple(x.shape)}")
    return torch.nn.functional.normalize(x, dim=1)


def _pair(image, text):
    image, text = _unit(image), _unit(text)
    if image.shape != text.shape:
        raise ValueError(f"paired embeddings differ in shape: {tuple(image.shape)} vs "
                         f"{tuple(text.shape)}")
    return image, text


def centroid_distance(image, text) -> float:
    image, text = _pair(image, text)
    return float((image.mean(0) - text.mean(0)).norm())


def alignment_score(image, text) -> float:
    image, text = _pair(image, text)
    return float((image * text).sum(1).mean())


def separation_score(image, text) -> float:
    image, text = _pair(image, text)
    cos = image @ text.T
    cos.fill_diagonal_(0)
    return float(1 - cos.mean())


def mean_unpaired_cosine(image, text) -> float:
    image, text = _pair(image, text)
    n = len(image)
    if n < 2:
        return float("nan")
    cos = image @ text.T
    return float((cos.sum() - cos.diagonal().sum()) / (n * n - n))


def uniformity(x, t: float = 2.0) -> float:
    x = _unit(x)
    if len(x) < 2:
        return float("nan")
    return float(torch.pdist(x).pow(2).mul(-t).exp().mean().log())


def gap_measures(image, text) -> dict:
    """Every measure above, as floats (plus n)."""
    return {"n": int(len(image)),
            "centroid_distance": centroid_distance(image, text),
            "alignment_score": alignment_score(image, text),
            "separation_score": separation_score(image, text),
            "mean_unpaired_cosine": mean_unpaired_cosine(image, text),
            "uniformity_image": uniformity(image),
            "uniformity_text": uniformity(text)}


def projection_figure(panels, path, pair_lines: int = 30, title=None) -> Path:
    """panels: [(label, image embeddings, text embeddings)]; one PCA panel each, saved
    atomically as PNG at path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from common.files import write_atomic

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (label, image, text) in zip(axes[0], panels):
        image, text = (_unit(image).numpy(), _unit(text).numpy())
        xy = PCA(n_components=2, random_state=0).fit_transform(np.concatenate([image, text]))
        pi, pt = xy[:len(image)], xy[len(image):]
        for k in range(min(pair_lines, len(pi), len(pt))):
            ax.plot([pi[k, 0], pt[k, 0]], [pi[k, 1], pt[k, 1]], color="0.7", lw=0.5, zorder=1)
        ax.scatter(pi[:, 0], pi[:, 1], s=6, c="#1f77b4", label="image", zorder=2)
        ax.scatter(pt[:, 0], pt[:, 1], s=6, c="#ff7f0e", label="text", zorder=2)
        m = gap_measures(image, text) if len(image) == len(text) else None
        sub = (f"\ngap {m['centroid_distance']:.2f}, align {m['alignment_score']:.2f}, "
               f"sep {m['separation_score']:.2f}") if m else ""
        ax.set_title(f"{label}{sub}", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
