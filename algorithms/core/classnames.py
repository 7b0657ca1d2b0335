"""Human-readable class names from dataset class folders, in label-index order."""
from __future__ import annotations

import re
from typing import Sequence


def humanize(folder_name: str) -> str:
    """'Alarm_Clock' -> 'alarm clock', 'aircraft_carrier' -> 'aircraft carrier';
    hyphens stay ('t-shirt', 'teddy-bear'), as the references' prompts keep them;
    all-caps words (acronyms such as 'TV') keep their case."""
    words = [w for w in re.split(r"[_\s]+", folder_name.strip()) if w]
    return " ".join(w if (w.isupper() and len(w) > 1) else w.lower() for w in words)


def classnames_from_folders(per_env_classes: Sequence[Sequence[str]], where: str = "") -> list:
    """One list of class folders per environment (as ImageFolder sorts them); they must
    agree, or label indices would mean different classes in different domains."""
    first = list(per_env_classes[0])
    for i, classes in enumerate(per_env_classes[1:], start=1):
        if list(classes) != first:
            diff = sorted(set(first) ^ set(classes))
            raise ValueError(f"{where}: environment {i} has different class folders than "
                             f"environment 0 (differing: {diff[:5]})")
    return [humanize(c) for c in first]
