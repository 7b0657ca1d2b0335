"""Shared plumbing: the one atomic writer, tolerant readers, environment variables."""
import json

import pytest

from common import env, files


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "sub" / "record.json"
    files.write_json_atomic(target, {"a": 1})

    def crash(tmp):
        tmp.write_text('{"a": 2, "trunc')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        files.write_atomic(target, crash)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]  # no temporary left


def test_a_corrupt_json_file_reads_as_none_with_a_warning(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text("{")
    with pytest.warns(UserWarning, match="results.json"):
        assert files.read_json(bad) is None


def test_cache_root_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.delenv(env.CACHE, raising=False)
    assert env.cache_root().name == "feature_cache"
    monkeypatch.setenv(env.CACHE, "off")
    assert env.cache_root() is None
    monkeypatch.setenv(env.CACHE, str(tmp_path))
    assert env.cache_root() == tmp_path
