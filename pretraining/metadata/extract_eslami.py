"""Write eslami_evaluation.json's class names and templates from a checkout of
sarahESL/AlignCLIP, so that the harness holds their lists without anyone typing them.

    python -m pretraining.metadata.extract_eslami --repo DIR [--commit SHA]

Reads, never runs, their files: `align_clip/zero_shot_metadata.py` is parsed with `ast`
(tuples of strings; templates are one-argument f-string lambdas, written with '{}'),
FLOWERS_CLASSNAMES is made as their file makes it (`classes/flowers_cat_to_name.json`,
labels 1..102 in order) and STANFORD_CLASSNAMES likewise (`class_names` of
`classes/stanford_cars_annos.mat`, read with scipy.io). Only the "source", "templates"
and "classnames" keys of the JSON are replaced; the protocol keys are kept.
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from common import cli

HERE = Path(__file__).resolve().parent
DATA = HERE / "eslami_evaluation.json"
METADATA = "align_clip/zero_shot_metadata.py"
FLOWERS = "classes/flowers_cat_to_name.json"
CARS = "classes/stanford_cars_annos.mat"
# their tuple name -> the harness's dataset key
CLASSNAMES = {"CIFAR10_CLASSNAMES": "cifar10", "CIFAR100_CLASSNAMES": "cifar100",
              "IMAGENET_CLASSNAMES": "imagenet", "IMAGENET_A_CLASSNAMES": "imagenet-a",
              "IMAGENET_R_CLASSNAMES": "imagenet-r", "IMAGENET_O_CLASSNAMES": "imagenet-o",
              "FOOD_CLASSNAMES": "food-101"}
TEMPLATES = {"OPENAI_IMAGENET_TEMPLATES": "openai_imagenet"}


def _template(node: ast.expr) -> str:
    """`lambda c: f'a photo of a {c}.'` -> 'a photo of a {}.'"""
    if not (isinstance(node, ast.Lambda) and len(node.args.args) == 1
            and isinstance(node.body, ast.JoinedStr)):
        raise ValueError(f"line {node.lineno}: not a one-argument f-string lambda")
    arg, out = node.args.args[0].arg, []
    for part in node.body.values:
        if isinstance(part, ast.Constant):
            out.append(part.value.replace("{", "{{").replace("}", "}}"))
        elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) \
                and part.value.id == arg and part.format_spec is None and part.conversion == -1:
            out.append("{}")
        else:
            raise ValueError(f"line {node.lineno}: a template with more than the class name")
    return "".join(out)


def parse_metadata(text: str) -> tuple[dict, dict]:
    """({dataset key: class names}, {template set: templates}) of their metadata file."""
    classnames, templates = {}, {}
    for stmt in ast.parse(text).body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)):
            continue
        name = stmt.targets[0].id
        if name in CLASSNAMES:
            classnames[CLASSNAMES[name]] = [ast.literal_eval(e) for e in stmt.value.elts]
        elif name in TEMPLATES:
            templates[TEMPLATES[name]] = [_template(e) for e in stmt.value.elts]
    missing = [n for n in list(CLASSNAMES) + list(TEMPLATES)
               if (CLASSNAMES.get(n) or TEMPLATES.get(n)) not in {**classnames, **templates}]
    if missing:
        raise ValueError(f"{METADATA}: no {missing[0]}")
    return classnames, templates


def extract(repo: Path, commit: str | None) -> dict:
    from scipy.io import loadmat
    classnames, templates = parse_metadata((repo / METADATA).read_text(encoding="utf-8"))
    flowers = json.loads((repo / FLOWERS).read_text(encoding="utf-8"))
    classnames["flowers-102"] = [flowers[str(label)] for label in range(1, 103)]
    cars = loadmat(str(repo / CARS))["class_names"][0]
    classnames["stanford-cars"] = [str(cars[i][0]) for i in range(196)]
    data = json.loads(DATA.read_text(encoding="utf-8")) if DATA.is_file() else {}
    data["source"] = {"repository": "sarahESL/AlignCLIP", "commit": commit,
                      "files": [METADATA, FLOWERS, CARS],
                      "written_by": "python -m pretraining.metadata.extract_eslami"}
    data["templates"] = templates
    data["classnames"] = dict(sorted(classnames.items()))
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, type=Path, help="a checkout of sarahESL/AlignCLIP")
    p.add_argument("--commit", help="the checkout's commit (recorded as the source)")
    args = p.parse_args(argv)
    from common.files import write_json_atomic
    write_json_atomic(DATA, extract(args.repo, args.commit))
    print(DATA)
    return 0


if __name__ == "__main__":
    cli.run(main)
