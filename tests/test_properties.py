"""Property-based tests (hypothesis), each bounded to a few dozen examples:
- hyperparameter sampling: every random draw of every harness method, for every
  dataset, is inside its declared range, JSON-serialisable and accepted by the
  `--hparams` check; DomainBed's registry draws the same way;
- `--hparams` check: accepts exactly the known keys with values of their JSON type;
- result records: arbitrary truncation and garbage lines never crash the collectors,
  never change the numbers of the intact jobs, and each damaged job is reported
  (the harness's collector and DomainBed's collect_results through the harness);
- split and caption files: any content parses or fails with one line naming the file.
"""
import contextlib
import io
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import recipes
from algorithms.core import registry
from algorithms.core.config import build_config
from algorithms.core.hparams import accepts, check_overrides
from common import records as records_mod
from results import kind_dassl, kind_domainbed, reference
from tests.conftest import needs_coop, needs_domainbed
from tests.test_results_dassl import write_run
from tests.test_results_domainbed import make_job

BOUNDED = settings(max_examples=40, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
METHODS = registry.methods()
DATASETS = (None, "PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet", "CLIPWorld",
            "PACSOpen", "OfficeHomeOpen", "DomainNetOpen", "CLIPWorldOpen", "ColoredMNIST",
            "ImageNet")
# samplers written by hand (a lambda) declare no range: the ranges their code draws from
UNDECLARED: dict = {}
JSON_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,),
              tuple: (list,), dict: (dict,)}  # an independent statement of check_overrides' rule

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3), max_leaves=8)


def json_roundtrip(value):
    return json.loads(json.dumps(value, allow_nan=False))


def in_declared_range(method, name, hp, value) -> bool:
    declared = hp.in_range(value)
    if declared is None:
        assert (method, name) in UNDECLARED, f"{method}.{name}: its sampler declares no range"
        return UNDECLARED[method, name](value)
    return declared


# --- hyperparameter sampling ---------------------------------------------------------

@BOUNDED
@given(method=st.sampled_from(sorted(METHODS)), dataset=st.sampled_from(DATASETS),
       seed=st.integers(0, 2 ** 32 - 1))
def test_every_draw_is_in_its_declared_range_and_json(method, dataset, seed):
    book = recipes.method_values(method, "domainbed", dataset)
    for name, hp in METHODS[method].hparams().items():
        value = hp.sample(np.random.RandomState(seed))
        assert json_roundtrip(value) == value, (method, name, value)
        assert in_declared_range(method, name, hp, value), (method, dataset, name, value)
        assert accepts(hp.default, value), (method, name, value)  # --hparams would take it
        assert in_declared_range(method, name, hp, hp.default), (method, dataset, name)
        if name in book and not hp.fixed:  # the recipe's default is a value the search draws
            assert in_declared_range(method, name, hp, book[name]), (method, dataset, name)


@needs_domainbed
@BOUNDED
@given(data=st.data(), seed=st.integers(0, 2 ** 31 - 1))
def test_domainbed_registry_draws_each_declared_hparam_in_range(data, seed):
    from domainbed import datasets, hparams_registry
    from domainbed_adapter import debug_datasets, patches
    patches.patch_loaded()
    method = data.draw(st.sampled_from(sorted(METHODS)))
    dataset = data.draw(st.sampled_from(sorted(datasets.DATASETS)))
    drawn = hparams_registry.random_hparams(method, dataset, seed)
    assert json_roundtrip(drawn) == drawn
    tiny = {**debug_datasets.TINY_MODEL, **recipes.values(method, "tiny")}
    book = recipes.recipe(method, "domainbed", dataset)
    for name, hp in METHODS[method].hparams().items():
        if dataset in debug_datasets.DEBUG_DATASETS and name in tiny:
            assert drawn[name] == tiny[name]
        elif name in book and hp.fixed:
            assert drawn[name] == book[name].value, (method, dataset, name)
        else:
            assert in_declared_range(method, name, hp, drawn[name]), (method, dataset, name)
    if "batch_size" in book:  # DomainBed's own, from the book's choices
        assert drawn["batch_size"] in book["batch_size"].search
    defaults = hparams_registry.default_hparams(method, dataset)
    check_overrides(drawn, defaults, "a random draw")  # every draw passes --hparams


@BOUNDED
@given(overrides=st.dictionaries(
    st.sampled_from(sorted(METHODS["AlignCLIP"].default_hparams())) | st.text(max_size=8),
    json_values, max_size=4))
def test_hparams_check_takes_exactly_known_keys_of_their_type(overrides):
    defaults = METHODS["AlignCLIP"].default_hparams()
    fine = all(k in defaults and (defaults[k] is None or type(v) in JSON_TYPES[type(defaults[k])])
               for k, v in overrides.items())
    try:
        check_overrides(overrides, defaults, "--hparams")
        build_config(METHODS["AlignCLIP"], overrides, "--hparams")  # the same check
    except ValueError as e:
        message = str(e)
        assert not fine and "\n" not in message and message.startswith("--hparams: ")
        bad = [k for k, v in overrides.items() if k not in defaults]
        named = [k if k.isprintable() else repr(k) for k in bad]  # a newline: as repr
        assert (all(k in message for k in named) and "known: " in message) if bad else \
            " must be " in message
    else:
        assert fine, overrides


# --- result records ------------------------------------------------------------------

def base_domainbed_sweep(root: Path) -> dict:
    """4 finished PACS jobs (2 test domains x 2 trials, 3 checkpoints each) -> {job: text}."""
    rng = np.random.default_rng(0)
    jobs = {}
    for trial in range(2):
        for test_env in range(2):
            accs = [{e: tuple(float(a) for a in rng.uniform(0.3, 0.95, 2)) for e in range(4)}
                    for _ in range(3)]
            job = make_job(root, "ZSCLIP", [test_env], trial, 0, accs)
            jobs[job] = (job / "results.jsonl").read_bytes()
    return jobs


garbage_lines = st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                          json_values.map(lambda v: json.dumps(v).encode()))
damages = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("drop last lines"), st.integers(1, 3)),  # cut at a line boundary
    st.tuples(st.just("garbage line"), st.floats(0, 1), garbage_lines))


def apply_damage(text: bytes, damage) -> tuple[bytes, bool]:
    """(new content, whether a whole reader must call it damaged)."""
    if damage[0] == "truncate":
        cut = int(damage[1] * len(text))
        return text[:cut], text[:cut].rstrip() != text.rstrip()
    lines = text.splitlines(keepends=True)
    if damage[0] == "drop last lines":
        return b"".join(lines[:-damage[1]]), any(l.strip() for l in lines[-damage[1]:])
    at = int(damage[1] * len(lines))
    garbage = damage[2].replace(b"\r", b"")
    new = b"".join(lines[:at]) + garbage + b"\n" + b"".join(lines[at:])
    return new, any(part.strip() for part in garbage.split(b"\n"))


def measured_cells(sweep) -> dict:
    tables = kind_domainbed.DomainBed().tables(sweep, reference.load()) if sweep else []
    return {(t.name, r.label, c): (t.cell(r, c).mean, t.cell(r, c).err, t.cell(r, c).n)
            for t in tables for r in t.rows if r.role == "measured" for c in t.columns}


@needs_domainbed
@BOUNDED
@given(chosen=st.lists(st.tuples(st.integers(0, 3), damages), min_size=1, max_size=3))
def test_damaged_domainbed_jobs_are_reported_and_intact_ones_unchanged(chosen):
    from domainbed.lib import reporting
    from domainbed_adapter import patches
    patches.patch_loaded()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jobs = base_domainbed_sweep(root / "sweep")
        names = sorted(jobs)
        expected_damaged = set()
        for index, damage in chosen:
            job = names[index]
            new, damaged = apply_damage((job / "results.jsonl").read_bytes(), damage)
            (job / "results.jsonl").write_bytes(new)
            if damaged:
                expected_damaged.add(job)
            elif job not in expected_damaged:  # a harmless change: still the same records
                assert [json.loads(l) for l in new.splitlines() if l.strip()] == \
                    [json.loads(l) for l in jobs[job].splitlines()]
        intact = [j for j in names if j not in expected_damaged]

        with pytest.warns() if expected_damaged else contextlib.nullcontext():
            sweep = kind_domainbed.load_sweep(sorted((root / "sweep").rglob("done")))
        assert {d.path.parent for _, d in sweep.damaged} == expected_damaged
        for job in intact:  # the same jobs in a sweep folder of their own
            shutil.copytree(job, root / "intact" / job.name)
        baseline = kind_domainbed.load_sweep(sorted((root / "intact").rglob("done"))) \
            if intact else None
        assert sweep.records == (baseline.records if baseline else [])
        assert measured_cells(sweep) == measured_cells(baseline)

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            upstream = reporting.load_records(str(root / "sweep"))
        assert list(upstream) == sweep.records
        named = {Path(re.match(r"collect_results: (.+?results\.jsonl)", line).group(1)).parent
                 for line in err.getvalue().splitlines()}
        assert named == expected_damaged and len(err.getvalue().splitlines()) == len(named)


@BOUNDED
@given(damage=st.one_of(st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
                        st.tuples(st.just("replace"), garbage_lines)))
def test_damaged_dassl_runs_are_reported_and_intact_ones_unchanged(damage):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed, acc in ((1, 90.0), (2, 92.0), (3, 94.0)):
            victim = write_run(root, "CoOp", "OxfordPets", "base", seed, acc)
        path = victim / "results.json"
        text = path.read_bytes()
        new = text[:int(damage[1] * len(text))] if damage[0] == "truncate" else damage[1]
        path.write_bytes(new)
        try:
            same = json.loads(new) == json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError):
            same = False
        with pytest.warns() if not same else contextlib.nullcontext():
            runs = kind_dassl.load_runs(sorted(p for p in root.rglob("*") if p.is_file()))
        assert sorted(r.accuracy for r in runs.runs) == ([90.0, 92.0, 94.0] if same else [90.0, 92.0])
        assert [d.path for d in runs.damaged] == ([] if same else [path])


@BOUNDED
@given(content=st.binary(max_size=200))
def test_the_record_reader_never_raises(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.jsonl"
        path.write_bytes(content)
        records, damage = records_mod.read_jsonl(path, records_mod.domainbed_problem)
        assert damage is None or (damage.path == path and "\n" not in str(damage))
        record, damage = records_mod.read_json(path)
        assert damage is None or (record is None and "\n" not in str(damage))


# --- split and caption files ---------------------------------------------------------

def fails_in_one_line_naming(error: Exception, what: str) -> bool:
    message = str(error).strip()
    return "\n" not in message and what in message


@BOUNDED
@given(caption=st.text(max_size=60), fields=st.data())
def test_world_captions_parse_back_or_fail_in_one_line(caption, fields):
    from clipworld import generate
    try:
        parsed = generate.caption_fields(caption)
    except ValueError as e:
        assert fails_in_one_line_naming(e, repr(caption))
    else:
        assert generate.make_caption(parsed) == caption
    made = {"domain": fields.draw(st.sampled_from(sorted(generate.DOMAINS))),
            "class": fields.draw(st.sampled_from(sorted(generate.CLASSES)))}
    if fields.draw(st.booleans()):
        made.update(size=fields.draw(st.sampled_from(sorted(generate.SIZES))),
                    colour=fields.draw(st.sampled_from(sorted(generate.COLOURS))))
    assert generate.make_caption(generate.caption_fields(generate.make_caption(made))) == \
        generate.make_caption(made)


split_rows = st.one_of(
    st.lists(st.one_of(st.just("a.png"), st.integers(-1, 3), st.text(max_size=4),
                       st.sampled_from(["photo", "sketch"]), st.none()), max_size=5),
    json_values)
split_files = st.one_of(
    st.fixed_dictionaries({k: st.lists(split_rows, max_size=3) for k in ("train", "val", "test")}),
    st.dictionaries(st.sampled_from(["train", "val", "test", "x"]), json_values, max_size=4),
    json_values).map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40)


@needs_coop
@BOUNDED
@example(content=b'{"train": [], "val": [], "test": []}')
@given(content=split_files)
def test_world_split_file_parses_or_fails_in_one_line(content):
    from yacs.config import CfgNode
    coop = str(Path(__file__).resolve().parent.parent / "third_party" / "CoOp")
    if coop not in sys.path:  # CoOp's datasets package (base/new subsampling)
        sys.path.append(coop)
    from clipworld.dassl_dataset import SPLIT_FILE, CLIPWorld
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clip_world"
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "a.png").write_bytes(b"")
        (folder / SPLIT_FILE).write_bytes(content)
        cfg = CfgNode({"DATASET": CfgNode({"ROOT": tmp, "SOURCE_DOMAINS": [], "TARGET_DOMAINS": [],
                                           "NUM_SHOTS": -1, "SUBSAMPLE_CLASSES": "all"})})
        try:
            CLIPWorld(cfg)
        except (ValueError, FileNotFoundError) as e:
            assert fails_in_one_line_naming(e, SPLIT_FILE), e


coco_like = st.recursive(st.none() | st.integers(-1, 2) | st.text(max_size=5),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                             st.sampled_from(["images", "annotations", "id", "file_name",
                                              "image_id", "caption", "split", "filename",
                                              "filepath", "sentences", "raw"]),
                             inner, max_size=5), max_leaves=20)
caption_files = coco_like.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=60)
text_files = st.text(max_size=80).map(str.encode) | st.binary(max_size=60)


def parses_or_fails_in_one_line(readers, content, errors, name="captions.json"):
    """Each reader(path, images folder) on a file holding `content` returns, or raises
    one of `errors` in one line that names the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path, images = Path(tmp) / name, Path(tmp) / "images"
        images.mkdir()
        path.write_bytes(content)
        for read in readers:
            try:
                read(path, images)
            except errors as e:
                assert fails_in_one_line_naming(e, str(path)), (read, e)


@BOUNDED
@given(spec=st.text(max_size=30))
def test_dataset_specs_parse_or_fail_in_one_line(spec):
    from algorithms.comalign import data as comalign_data
    from common import readers
    for allowed, what in ((("coco", "karpathy", "pairs", "world"), ""),
                          (comalign_data.PAIR_TYPES, "pair set")):
        try:
            readers.parse_spec(spec, allowed, what)
        except readers.DataError as e:
            assert fails_in_one_line_naming(e, repr(spec))


@BOUNDED
@given(content=caption_files)
def test_evaluation_caption_json_parses_or_fails_in_one_line(content):
    from common import readers
    from pretraining import datasets
    parses_or_fails_in_one_line([datasets.coco_captions, datasets.karpathy,
                                 lambda p, _: readers.read_coco_instances(p),
                                 lambda p, _: readers.read_sugarcrepe(p),
                                 lambda p, _: readers.read_aro(p)], content, readers.DataError)


@BOUNDED
@example(content=b"\x80")
@given(content=text_files)
def test_evaluation_caption_csv_and_class_names_parse_or_fail_in_one_line(content):
    from common import readers
    from pretraining import datasets
    parses_or_fails_in_one_line([lambda p, _: datasets.pairs_csv(p),
                                 lambda p, _: readers.read_classnames(p)], content,
                                readers.DataError, name="pairs.csv")


@BOUNDED
@example(content=b"{}")
@given(content=caption_files | text_files)
def test_comalign_caption_files_parse_or_fail_in_one_line(content):
    from algorithms.comalign import data as comalign_data
    from common import readers

    def pairs(spec_type):
        return lambda p, images: comalign_data.load_pairs(f"{spec_type}:{p},images={images}")
    parses_or_fails_in_one_line([pairs("coco"), pairs("karpathy"), pairs("pairs")], content,
                                readers.DataError)
