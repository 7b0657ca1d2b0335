"""Atomic writes (a temporary file in the same folder, then rename: a crash leaves the
old file or the new one, never half of one) and tolerant record readers."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (hidden, same suffix); on success it is renamed
    to `path`, on error removed. For writers that want a file name (torch.save, savefig, h5py)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary keeps the suffix, for writers that choose a format by it (savefig)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_dir(final, finished: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a hidden temporary folder beside `final` to fill; when the block succeeds it
    is renamed to `final`, unless `finished(final)` already holds (a concurrent run got
    there first). It is removed in every other case: a half-filled folder never takes
    the final name."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield work
        if not finished(final):
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work)


def write_atomic(path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path), then rename the result to `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path):
    """One JSON record, or None (with a warning naming the file) when it is corrupt."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: skipping a corrupt record ({e})")
        return None
