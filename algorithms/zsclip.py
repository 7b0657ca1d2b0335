"""Zero-shot CLIP: text classifier from class names and prompt templates, no training.
Evaluation features come from the shared feature cache when it holds the batch
(algorithms/core/method.py `eval_features`). Documentation: docs/methods/zsclip.md."""
from __future__ import annotations

from algorithms.core.method import CLIPMethod
from algorithms.core.registry import register_method


@register_method
class ZeroShotCLIP(CLIPMethod):
    name = "ZSCLIP"
    cache_features = True  # predict's features from the shared feature cache
