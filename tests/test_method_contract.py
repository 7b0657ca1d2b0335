"""The method contract: methods are discovered, declare what the adapters and the demo
read, and the layering holds (algorithms/ never imports the layers above it)."""
import ast
import pkgutil
from pathlib import Path

import pytest
import torch

import algorithms
from algorithms.core import registry, selection
from algorithms.core.method import CLIPMethod
from tests.conftest import REPO, TINY

ABOVE_ALGORITHMS = ("sweeps", "results", "clipworld", "pretraining", "domainbed_adapter",
                    "trainers", "benchmarks")


def test_every_method_module_is_discovered_without_a_list():
    # a method is a module directly in algorithms/ or a package there (its __init__ imports it)
    modules = {info.name for info in pkgutil.iter_modules(algorithms.__path__)
               if info.name not in registry.MACHINERY}
    found = {cls.__module__.split(".")[1] for cls in registry.methods().values()}
    assert found <= modules and {"zsclip", "calip", "alignclip", "comalign"} <= found
    assert not (REPO / "algorithms" / "registry.py").exists()  # no METHOD_MODULES list
    source = (REPO / "algorithms" / "core" / "registry.py").read_text()
    assert "ZSCLIP" not in source and "alignclip" not in source


@pytest.mark.parametrize("name", sorted(registry.methods()))
def test_declarations_match_what_the_method_does(name):
    method_cls = registry.get_method(name)
    assert issubclass(method_cls, CLIPMethod) and method_cls.name == name
    assert method_cls.selects_on in (None, selection.VALIDATION, selection.TEST)
    assert method_cls.oracle == (method_cls.selects_on == selection.TEST)
    torch.manual_seed(0)
    method = method_cls.create(["circle", "square", "star"], TINY)
    assert method.has_trainable_parameters() == method_cls.trains, name
    assert (REPO / "docs" / "methods" / f"{name.lower()}.md").is_file() or \
        any(name in p.read_text() for p in (REPO / "docs" / "methods").glob("*.md")), name


def test_an_oracle_must_say_so_and_selection_needs_select():
    with pytest.raises(ValueError, match="selects_on"):
        type("Bad", (CLIPMethod,), {"name": "Bad", "selects_on": "val"})
    with pytest.raises(TypeError, match="no select"):
        type("Bad", (CLIPMethod,), {"name": "Bad", "selects_on": "test"})
    oracle = type("Peek", (CLIPMethod,), {"name": "Peek", "selects_on": "test",
                                           "select": lambda self, batches, data_key=None: {}})
    assert oracle.oracle


class _Selector:
    name, selects_on = "Toy", selection.VALIDATION

    def __init__(self):
        self.seen = []

    def select(self, batches, data_key=None):
        self.seen.append((list(batches), data_key))
        return {"chosen": 1.0}


def test_selection_protocol_asks_for_the_declared_data_once():
    method, asked = _Selector(), []

    def provide(which):
        asked.append(which)
        return [(1, 2)], {"split": "val"}, "val"

    assert selection.run(method, provide) == {"chosen": 1.0, "split": "val"}
    assert asked == ["validation"] and method.seen == [([(1, 2)], {"split": "val"})]
    warnings = []
    assert selection.run(_Selector(), lambda which: None, warn=warnings.append) == {}
    assert "no validation data" in warnings[0]
    plain = type("Plain", (), {"selects_on": None, "name": "Plain"})()
    assert selection.run(plain, lambda which: pytest.fail("asked for data")) == {}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


HARNESS_PACKAGES = ("common", "algorithms", "recipes", "domainbed_adapter", "trainers",
                    "clipworld", "pretraining", "evaluation", "sweeps", "results", "benchmarks")
# package -> what it must never import: no arrow runs back up. The collector (results)
# reads records by field: it imports no adapter, no model code and no torch (runs no model).
NEVER_IMPORTS = {
    "algorithms": (*ABOVE_ALGORITHMS, "evaluation"),
    "common": tuple(p for p in HARNESS_PACKAGES if p != "common"),
    "domainbed_adapter": ("results", "sweeps", "evaluation", "benchmarks"),
    "results": ("domainbed_adapter", "trainers", "clipworld", "algorithms", "pretraining",
                "evaluation", "sweeps", "benchmarks", "torch", "open_clip"),
}


def test_algorithms_never_import_the_layers_above_them():
    """Nor does any layer in NEVER_IMPORTS (function-level imports count too)."""
    assert set(ABOVE_ALGORITHMS) <= set(NEVER_IMPORTS["algorithms"])
    offending = [(str(path.relative_to(REPO)), name)
                 for package, forbidden in NEVER_IMPORTS.items()
                 for path in (REPO / package).rglob("*.py")
                 for name in _imports(path) if name.split(".")[0] in forbidden]
    assert not offending
    assert not (REPO / "results" / "domain_gap.py").exists()  # runs models: evaluation/


def test_no_import_cycles_between_harness_modules():
    packages = tuple(p for p in HARNESS_PACKAGES if (REPO / p).is_dir())
    graph = {}
    for package in packages:
        for path in (REPO / package).rglob("*.py"):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            module = module.removesuffix(".__init__")
            graph[module] = {name for name in _imports(path)
                             if name.split(".")[0] in packages and name != module}
    known = set(graph)

    def resolve(name):  # `from pkg import mod` names pkg; keep what is a module
        return name if name in known else None

    state = {}

    def visit(module, stack):
        state[module] = "open"
        for name in filter(None, map(resolve, graph.get(module, ()))):
            if state.get(name) == "open":
                pytest.fail(" -> ".join([*stack, module, name]))
            if name not in state:
                visit(name, [*stack, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
