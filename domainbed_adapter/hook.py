"""Interpreter-start hook (installed as a .pth line by third_party/install.py).

It only installs an import finder; when a DomainBed module named in patches.PATCHES is
first imported, in any process, its patches run right after the module body. Nothing
heavy is imported unless DomainBed itself is.
"""
import importlib.abc
import importlib.util
import sys

from domainbed_adapter.patches import PATCHES


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        from domainbed_adapter import patches
        patches.patch(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install():
    if not any(isinstance(f, _PatchingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchingFinder())


install()
