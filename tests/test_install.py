import importlib.util

from tests.conftest import REPO


def load_installer():
    spec = importlib.util.spec_from_file_location("installer", REPO / "third_party" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unreachable_upstream_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    installer = load_installer()
    monkeypatch.setattr(installer, "HERE", tmp_path)
    monkeypatch.setattr(installer, "GITHUB", (tmp_path / "no-such-host").as_uri())
    assert installer.fetch("DomainBed") is False
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert "DomainBed missing" in lines[0] and "disabled: DomainBed algorithms" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_pinned_checkout_is_a_no_op(tmp_path, monkeypatch, capsys):
    import subprocess
    installer = load_installer()
    origin = tmp_path / "origin" / "facebookresearch" / "DomainBed"
    origin.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q", str(origin)], check=True)
    subprocess.run(git + ["-C", str(origin), "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(origin), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    monkeypatch.setattr(installer, "HERE", tmp_path / "tp")
    monkeypatch.setattr(installer, "GITHUB", (tmp_path / "origin").as_uri())
    monkeypatch.setitem(installer.UPSTREAMS, "DomainBed", ("facebookresearch/DomainBed", head[:12], "x"))
    (tmp_path / "tp").mkdir()
    assert installer.fetch("DomainBed") is True
    assert "at " + head[:12] in capsys.readouterr().out
    assert installer.fetch("DomainBed") is True
    assert capsys.readouterr().out == ""


def test_pth_hook_line_runs_only_while_the_clone_exists(tmp_path, monkeypatch):
    import subprocess
    import sys
    import sysconfig
    installer = load_installer()
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"purelib": str(site)})
    imported = {}
    for name, repo in (("gone", tmp_path / "deleted-clone"), ("here", REPO)):
        monkeypatch.setattr(installer, "REPO", repo)
        monkeypatch.setattr(installer, "HERE", repo / "third_party")
        installer.write_pth(domainbed=True)
        line = (site / installer.PTH_NAME).read_text().splitlines()[-1]
        assert line.startswith("import ")  # site.py executes such lines
        probe = f"exec({line!r}); import sys; print('domainbed_adapter.hook' in sys.modules)"
        result = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True,
                                text=True, cwd=REPO)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        imported[name] = result.stdout.strip()
    assert imported == {"gone": "False", "here": "True"}


def test_upstreams_are_changed_only_through_their_doors():
    """No unittest.mock outside tests/ (upstream is changed through the patch tables and
    pretraining/open_clip_run.py), and no harness module deletes sys.modules entries."""
    import re
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", "third_party", "build", "data", "output") or \
                any(p.startswith(".") for p in rel.parts):
            continue
        text = path.read_text(errors="replace")
        if re.search(r"unittest\.mock|from unittest import mock|del sys\.modules|"
                     r"sys\.modules\.pop", text):
            offenders.append(str(rel))
    assert offenders == []
