"""Zero-shot CLIP: text classifier from class names and prompt templates, no training.
Documentation: docs/methods/zsclip.md."""
from __future__ import annotations

from algorithms.core.method import CLIPMethod
from algorithms.core.registry import register_method


@register_method
class ZeroShotCLIP(CLIPMethod):
    name = "ZSCLIP"

    def update(self, images, labels):
        return {}
