"""Interpreter-start hook (installed as a .pth line by third_party/install.py).

It only installs an import finder; when a DomainBed module is first imported, in any
process (sweep, train subprocesses, collect_results), the matching patch in
algorithms/domainbed_plugin.py runs right after the module body. Nothing heavy is
imported unless DomainBed itself is.
"""
import importlib.abc
import importlib.util
import sys

PATCHED_MODULES = (
    "domainbed.command_launchers",
    "domainbed.algorithms",
    "domainbed.hparams_registry",
    "domainbed.datasets",
    "domainbed.lib.fast_data_loader",
    "domainbed.lib.reporting",
)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        from algorithms import domainbed_plugin
        domainbed_plugin.patch(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHED_MODULES:
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
