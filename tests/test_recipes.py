"""The recipe book (recipes/recipes.yaml): every value declared, typed and sourced, and
asked the same way by every harness."""
import pytest

import recipes
from algorithms.core import registry
from algorithms.core.config import build_config


def test_the_book_sets_only_declared_values_of_their_type_each_with_a_source():
    recipes.check()  # raises on an unknown method or key or a wrong type
    for entry in recipes.read_book()["entries"]:
        assert str(entry["source"]).strip()


def test_a_value_the_method_does_not_declare_is_refused(tmp_path):
    book = tmp_path / "recipes.yaml"
    book.write_text("entries:\n  - {methods: [CLIPood], harness: dassl, values: {margin: 0.1},"
                    " source: x}\n")
    with pytest.raises(ValueError, match=r"entry 1 \(CLIPood\): unknown hyperparameter margin"):
        recipes.check(book)
    book.write_text("entries:\n  - {methods: [CLIPood], harness: dassl, values: {bma_beta: x},"
                    " source: x}\n")
    with pytest.raises(ValueError, match="bma_beta must be a number"):
        recipes.check(book)


def test_later_entries_win_and_selectors_match():
    assert "lr" not in recipes.values("CLIPood", "domainbed", "PACS")  # the declared 5e-6
    assert recipes.values("CLIPood", "domainbed", "OfficeHome")["lr"] == 1e-5
    assert recipes.values("CLIPood", "domainbed", "OfficeHomeOpen")["lr"] == 3e-6  # later wins
    assert recipes.values("AlignCLIP", "tiny")["lr"] == 1e-4  # AlignCLIP's own after the shared
    assert recipes.values("ZSCLIP", "demo") == {}  # `trains: true` selects training methods
    assert recipes.values("CLIPLP", "demo") == {"batch_size": 16}
    assert recipes.recipe("CALIPFS", "domainbed")["batch_size"].search == (16, 32)


@pytest.mark.parametrize("name", sorted(registry.methods()))
def test_every_harness_builds_a_config_from_the_book(name):
    method_cls = registry.get_method(name)
    for harness in ("domainbed", "dassl", "tiny"):
        build_config(method_cls, recipes.method_values(name, harness, "DomainNetOpen"), harness)
