"""Recall@K of image-text retrieval, one rule for the pretraining evaluation
(pretraining/evaluate.py) and ComAlign's (algorithms/comalign/evaluate.py, chunked).

A query (a caption, or an image) has right candidates (its image; the image's captions)
and wrong ones. It is found at K when fewer than K wrong candidates score at least as
high as its best right candidate. Ties count against the query: a wrong candidate with
the same score as the best right one ranks before it, so the result never depends on the
order of the data or on how a sort breaks ties, and a model that scores everything alike
finds nothing (with at least K wrong candidates). NaN scores count as -inf. A query
without a right candidate is never found. Recalls are in % of the queries.
"""
from __future__ import annotations

from typing import Dict, Sequence


class RecallCounter:
    """Recall@K for `num_queries` queries whose candidates may arrive in chunks: per
    query, the best right score so far and the `max_k` highest wrong scores."""

    def __init__(self, num_queries: int, max_k: int, device=None):
        import torch
        self.max_k = int(max_k)
        self.best_right = torch.full((num_queries,), -float("inf"), device=device)
        self.top_wrong = torch.full((num_queries, self.max_k), -float("inf"), device=device)

    def add(self, scores, right, rows=slice(None)) -> None:
        """scores [q, c] of queries `rows` against c more candidates; right [q, c] marks
        each query's right candidates among them."""
        import torch
        scores = torch.nan_to_num(scores.float(), nan=-float("inf"))
        right = right.to(torch.bool)
        low = torch.tensor(-float("inf"), device=scores.device)
        best = torch.where(right, scores, low).amax(dim=1) if scores.shape[1] else None
        if best is not None:
            self.best_right[rows] = torch.maximum(self.best_right[rows], best)
        wrong = torch.cat([self.top_wrong[rows], torch.where(right, low, scores)], dim=1)
        self.top_wrong[rows] = wrong.topk(self.max_k, dim=1).values

    def found_within(self):
        """[queries] the number of wrong candidates at or above the best right one
        (capped at max_k): the query is found at K when this is < K."""
        return (self.top_wrong >= self.best_right[:, None]).sum(dim=1)

    def recalls(self, ks: Sequence[int]) -> Dict[str, float]:
        """{"R@k": % of queries found at k} for k <= max_k."""
        if max(ks) > self.max_k:
            raise ValueError(f"recall at {max(ks)} asked of a counter kept to {self.max_k}")
        ahead = self.found_within()
        return {f"R@{k}": 100.0 * float((ahead < k).float().mean()) for k in ks}


def retrieval_recalls(similarity, text_to_image, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """R@K both ways from S[t, i] = score of caption t with image i (captions x images);
    text_to_image[t] = the index of caption t's image. Text->image: a caption's right
    candidate is its image; image->text: an image's right candidates are its captions
    (the rule: the module docstring)."""
    import torch
    sim = torch.as_tensor(similarity, dtype=torch.float32)
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=sim.device)
    n_texts, n_images = sim.shape
    right = t2i[:, None] == torch.arange(n_images, device=sim.device)[None, :]  # [T, I]
    text_to_image_counter = RecallCounter(n_texts, max(ks), sim.device)
    text_to_image_counter.add(sim, right)
    image_to_text_counter = RecallCounter(n_images, max(ks), sim.device)
    image_to_text_counter.add(sim.T, right.T)
    return {"text_to_image": text_to_image_counter.recalls(ks),
            "image_to_text": image_to_text_counter.recalls(ks)}
