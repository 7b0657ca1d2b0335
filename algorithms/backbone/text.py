"""Text side: prompt-template sets and zero-shot text classifiers."""
from __future__ import annotations

from typing import Dict, Sequence

import open_clip
import torch

TEMPLATE_SETS: Dict[str, Sequence[str]] = {
    "photo": ("a photo of a {}.",),
    "openai_imagenet": tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES),
    "simple_imagenet": tuple(t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES),
}


def resolve_templates(templates) -> Sequence[str]:
    """A template-set name (see TEMPLATE_SETS), a single template with '{}', or a list."""
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        if "{}" in templates:
            return (templates,)
        raise ValueError(f"unknown template set {templates!r}; known: {sorted(TEMPLATE_SETS)}")
    templates = tuple(templates)
    if not templates or not all("{}" in t for t in templates):
        raise ValueError(f"templates must each contain '{{}}': {templates!r}")
    return templates


@torch.no_grad()
def text_classifier(model, tokenizer, classnames: Sequence[str], templates="photo",
                    device="cpu") -> torch.Tensor:
    """[C, D] L2-normalised class embeddings, averaged over a template ensemble."""
    weights = open_clip.build_zero_shot_classifier(
        model, tokenizer, list(classnames), resolve_templates(templates),
        num_classes_per_batch=10, device=device, use_tqdm=len(classnames) > 50)
    return weights.T.contiguous()


