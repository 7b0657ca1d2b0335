"""Result records: JSON files written atomically, so a crash never leaves a half file."""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path


def write_json_atomic(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    """Write a text file atomically (tables, markdown, LaTeX, CSV)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_jsonl(path) -> list:
    """Records of a JSON-lines file; a truncated or corrupt line is skipped with a warning
    naming file and line (DomainBed's load_records is patched to use it)."""
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{line_no}: skipping a truncated or corrupt record")
    return records


def read_json(path):
    """One JSON record, or None (with a warning naming the file) when it is corrupt."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: skipping a corrupt record ({e})")
        return None
