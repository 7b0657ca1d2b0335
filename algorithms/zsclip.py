"""Zero-shot CLIP: text classifier from class names and prompt templates, no training."""
from __future__ import annotations

from algorithms.method import CLIPMethod
from algorithms.registry import register_method


@register_method
class ZeroShotCLIP(CLIPMethod):
    name = "ZSCLIP"

    def update(self, images, labels):
        return {}
