"""Install the pinned upstreams into third_party/ and hook the harness into them.

    python third_party/install.py [--harness [--extras test]] [--only DomainBed ...]

--harness first installs the harness itself (`pip install -e .`, with `--extras` its
extras, e.g. the test suite's; without --only also its `all` extra: Dassl's, tllib's and
AlignCLIP-IMSep's dependencies, setup.py) unless this clone is already installed with them.
--only installs just the named upstreams (`make demo`: DomainBed, and the harness without
extras; `make test`: all).

Clones DomainBed, Dassl.pytorch, CoOp, Transfer-Learning-Library (tllib), MaPLe's
multimodal-prompt-learning and PromptSRC with plain
`git clone https://github.com/...` (so `git config url.<mirror>.insteadOf` redirects
work), checks out the pins, installs Dassl and tllib editable without their dependency
pins, and writes one .pth file into site-packages
that puts DomainBed on sys.path and installs the harness's DomainBed import hook.
Idempotent: what is already in place is left alone. Where an upstream cannot be
cloned, one line says what is missing and what that disables; the rest still installs.
"""
import argparse
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PTH_NAME = "clipbench_upstream.pth"
GITHUB = "https://github.com"

UPSTREAMS = {  # dir: (GitHub owner/name, pinned commit, what it enables)
    "DomainBed": ("facebookresearch/DomainBed", "b93c22a1cfc3",
                  "DomainBed algorithms, sweeps and collect_results"),
    "Dassl.pytorch": ("KaiyangZhou/Dassl.pytorch", "c61a1b570ac6",
                      "Dassl/CoOp trainers (train_coop.py)"),
    "CoOp": ("KaiyangZhou/CoOp", "ff61507c7904", "CoOp datasets and trainers (train_coop.py)"),
    "Transfer-Learning-Library": ("thuml/Transfer-Learning-Library", "c4aa59eb5656",
                                  "domain-gap analysis (python -m results.domain_gap)"),
    "multimodal-prompt-learning": ("muzairkhattak/multimodal-prompt-learning", "69bce21ae8ed",
                                   "MaPLe, IVLP and VPT trainers (train_coop.py)"),
    "PromptSRC": ("muzairkhattak/PromptSRC", "bb95c77b634d", "PromptSRC trainer (train_coop.py)"),
}
EDITABLE = {"Dassl.pytorch": "dassl", "Transfer-Learning-Library": "tllib"}  # dir: module


def _git(*args, cwd=None):
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)


def at_pin(path: Path, commit: str) -> bool:
    if not (path / ".git").exists():
        return False
    head = _git("rev-parse", "HEAD", cwd=path)
    return head.returncode == 0 and head.stdout.strip().startswith(commit)


def fetch(name: str) -> bool:
    repo, commit, enables = UPSTREAMS[name]
    path = HERE / name
    if at_pin(path, commit):
        return True
    if not (path / ".git").exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
        partial = path.with_name(name + ".partial")
        subprocess.run(["rm", "-rf", str(partial)], check=True)
        clone = _git("clone", "-q", f"{GITHUB}/{repo}", str(partial))
        if clone.returncode != 0:
            subprocess.run(["rm", "-rf", str(partial)])
            print(f"[install] {name} missing: cannot clone {GITHUB}/{repo} "
                  f"({clone.stderr.strip().splitlines()[-1] if clone.stderr.strip() else 'no reason given'}); "
                  f"disabled: {enables}")
            return False
        partial.rename(path)
    checkout = _git("-c", "advice.detachedHead=false", "checkout", "-q", commit, cwd=path)
    if checkout.returncode != 0:
        print(f"[install] {name}: cannot check out pin {commit}: {checkout.stderr.strip()}; "
              f"disabled: {enables}")
        return False
    print(f"[install] {name} at {commit}")
    return True


def editable_installed(name: str) -> bool:
    module = EDITABLE[name]
    probe = f"import importlib.util, os; print(os.path.realpath(importlib.util.find_spec({module!r}).origin))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return out.returncode == 0 and str(HERE / name) in out.stdout


def install_editable(name: str):
    """pip install -e without the upstream's dependency pins (dev tools, opencv, ...): the
    runtime dependencies the harness uses come from its own setup.py."""
    if editable_installed(name):
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                    "--no-deps", "-e", str(HERE / name)], check=True)
    print(f"[install] {name} installed (editable, no dependency pins)")


def harness_installed(extras=()) -> bool:
    """This clone is the installed clipbench, with every requirement of `extras`."""
    import importlib.metadata as metadata
    import re
    # pip's record of the editable install (the clone's own clipbench.egg-info, found
    # first on sys.path, has no direct_url.json)
    found = [d for d in metadata.distributions(name="clipbench")
             if REPO.as_uri() in (d.read_text("direct_url.json") or "")]
    if not found:
        return False
    dist = found[0]
    for requirement in dist.requires or []:
        name, _, marker = requirement.partition(";")
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", marker)
        if extra and extra.group(1) in extras:
            try:
                metadata.distribution(re.split(r"[<>=!~\[ ]", name.strip(), 1)[0])
            except metadata.PackageNotFoundError:
                return False
    return True


def install_harness(extras=()):
    if not harness_installed(extras):
        target = f"{REPO}[{','.join(extras)}]" if extras else str(REPO)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", target], check=True)
        print(f"[install] harness installed (editable{', extras ' + ', '.join(extras) if extras else ''})")


def write_pth(domainbed: bool):
    """One .pth: repo root, DomainBed's clone, and the hook that registers the harness."""
    lines = [str(REPO)]
    if domainbed:
        # a clone that has been deleted since: skip the hook instead of a traceback at
        # every interpreter start
        lines += [str(HERE / "DomainBed"), f"import os; os.path.isdir({str(REPO)!r}) and "
                  "__import__('domainbed_adapter.hook')"]
    content = "\n".join(lines) + "\n"
    target = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    if not target.exists() or target.read_text() != content:
        tmp = target.with_suffix(".tmp")
        tmp.write_text(content)
        tmp.replace(target)
        print(f"[install] wrote {target.name} into site-packages")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harness", action="store_true", help="also pip install -e .")
    parser.add_argument("--extras", nargs="*", default=[], help="the harness's extras (test)")
    parser.add_argument("--only", nargs="*", choices=list(UPSTREAMS),
                        help="install only these upstreams (default: all)")
    args = parser.parse_args()
    if args.harness:
        install_harness(tuple(args.extras) + (() if args.only else ("all",)))
    wanted = args.only or list(UPSTREAMS)
    ok = {name: fetch(name) if name in wanted else (HERE / name / ".git").exists()
          for name in UPSTREAMS}
    for name in EDITABLE:
        if ok[name] and name in wanted:
            install_editable(name)
    write_pth(domainbed=ok["DomainBed"])


if __name__ == "__main__":
    main()
