"""Human-readable class names from dataset class folders, in label-index order."""
from __future__ import annotations

import re
from typing import Optional, Sequence


def humanize(folder_name: str) -> str:
    """'Alarm_Clock' -> 'alarm clock', 'aircraft_carrier' -> 'aircraft carrier';
    hyphens stay ('t-shirt', 'teddy-bear'), as the references' prompts keep them;
    all-caps words (acronyms such as 'TV') keep their case."""
    words = [w for w in re.split(r"[_\s]+", folder_name.strip()) if w]
    return " ".join(w if (w.isupper() and len(w) > 1) else w.lower() for w in words)


def classnames_from_folders(per_env_classes: Sequence[Sequence[str]], where: str = "",
                            domains: Optional[Sequence[str]] = None) -> list:
    """One list of class folders per environment (as ImageFolder sorts them); they must
    agree, or label indices would mean different classes in different domains.
    `domains`: the environments' folder names, for the message."""
    first = list(per_env_classes[0])
    names = list(domains) if domains else [str(i) for i in range(len(per_env_classes))]
    for i, classes in enumerate(per_env_classes[1:], start=1):
        if list(classes) != first:
            only_first = sorted(set(first) - set(classes))
            only_here = sorted(set(classes) - set(first))
            detail = "; ".join(part for part in (
                f"only in {names[0]}: {', '.join(only_first[:5])}" if only_first else "",
                f"only in {names[i]}: {', '.join(only_here[:5])}" if only_here else "") if part)
            raise ValueError(f"{where}: environment {i} has different class folders than "
                             f"environment 0 ({names[i]} vs {names[0]}; "
                             f"{detail or 'same names, another order'}): label indices would "
                             f"mean different classes in different domains")
    return [humanize(c) for c in first]
