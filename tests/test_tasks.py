"""Registry tests on the real offline data (found through softprompt.tasks.resolve_data_dir)."""
from __future__ import annotations

import collections
import hashlib
import json
import sys
import types
import warnings
from pathlib import Path

import pytest

from softprompt import tasks as T
from softprompt.tasks import datadir as datadir_mod
from softprompt.tasks.errors import DataNotFoundError, HubUnavailableError, UnknownSplitError

DATA = T.resolve_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="offline data (../shared/data) not found")

ALL_NAMES = [
    "glue/cola", "glue/sst2", "glue/mrpc", "glue/rte", "glue/stsb", "glue/wnli",
    "superglue/cb", "superglue/rte", "superglue/boolq", "superglue/copa", "superglue/multirc", "superglue/wic",
    "superglue/wsc", "agnews", "conll2003", "commonsense/arc_easy", "commonsense/arc_challenge",
    "commonsense/openbookqa", "commonsense/piqa", "commonsense/hellaswag", "commonsense/winogrande",
]

# (task, split) -> number of records, from ../shared/data/README.md (+ the documented derived splits)
COUNTS = {
    ("glue/cola", "train"): 8551, ("glue/cola", "dev"): 1043, ("glue/cola", "test"): 1063,
    ("glue/sst2", "train"): 67349, ("glue/sst2", "dev"): 872, ("glue/sst2", "test"): 1821,
    ("glue/mrpc", "train"): 3667, ("glue/mrpc", "dev"): 408, ("glue/mrpc", "test"): 1725,
    ("glue/rte", "train"): 2490, ("glue/rte", "dev"): 277, ("glue/rte", "test"): 3000,
    ("glue/stsb", "train"): 5749, ("glue/stsb", "dev"): 1500, ("glue/stsb", "test"): 1379,
    ("glue/wnli", "train"): 635, ("glue/wnli", "dev"): 71, ("glue/wnli", "test"): 146,
    ("superglue/cb", "train"): 250, ("superglue/cb", "val"): 56, ("superglue/cb", "test"): 250,
    ("superglue/cb", "train32"): 32, ("superglue/cb", "dev32"): 32,
    ("superglue/rte", "train"): 2490, ("superglue/rte", "val"): 277, ("superglue/rte", "test"): 3000,
    ("superglue/rte", "train32"): 32, ("superglue/rte", "dev32"): 32,
    ("superglue/boolq", "train32"): 32, ("superglue/boolq", "dev32"): 32, ("superglue/boolq", "val"): 3270,
    ("superglue/copa", "train32"): 32, ("superglue/copa", "dev32"): 32, ("superglue/copa", "val"): 100,
    ("superglue/multirc", "val"): 4848,
    ("superglue/wic", "train32"): 32, ("superglue/wic", "dev32"): 32, ("superglue/wic", "val"): 638,
    ("superglue/wsc", "train32"): 32, ("superglue/wsc", "dev32"): 32, ("superglue/wsc", "val"): 104,
    ("agnews", "full"): 7600, ("agnews", "train"): 6080, ("agnews", "dev"): 760, ("agnews", "test"): 760,
    ("conll2003", "train"): 14041, ("conll2003", "dev"): 3250, ("conll2003", "test"): 3453,
    ("commonsense/arc_easy", "train"): 2251, ("commonsense/arc_easy", "dev"): 570,
    ("commonsense/arc_easy", "test"): 2376,
    ("commonsense/arc_challenge", "train_full"): 1056, ("commonsense/arc_challenge", "train"): 950,
    ("commonsense/arc_challenge", "dev"): 106, ("commonsense/arc_challenge", "test"): 1172,
    ("commonsense/openbookqa", "train"): 4957, ("commonsense/openbookqa", "dev"): 500,
    ("commonsense/openbookqa", "test"): 500,
    ("commonsense/piqa", "full"): 1838, ("commonsense/piqa", "train"): 919, ("commonsense/piqa", "test"): 919,
    ("commonsense/hellaswag", "full"): 10042, ("commonsense/hellaswag", "train"): 8034,
    ("commonsense/hellaswag", "dev"): 1004, ("commonsense/hellaswag", "test"): 1004,
    ("commonsense/winogrande", "full"): 1267, ("commonsense/winogrande", "train"): 1013,
    ("commonsense/winogrande", "dev"): 127, ("commonsense/winogrande", "test"): 127,
}


def _load(name, split, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped data has no malformed rows
        return T.load_split(name, split, **kw)


def _label_counts(records):
    return collections.Counter(r["label"] for r in records)


# ---------------------------------------------------------------- registry
def test_registry_names_and_specs():
    specs = T.list_tasks()
    assert [s.name for s in specs] == ALL_NAMES
    for s in specs:
        assert isinstance(s, T.TaskSpec)
        assert s.kind in {"classification", "regression", "multiple_choice", "token_classification"}
        assert s.metric in s.metrics
        for sp in (s.train_split, s.eval_split, s.test_split):
            assert sp is None or sp in s.splits
        assert s.test_split not in s.unlabeled_splits and s.eval_split not in s.unlabeled_splits
        assert callable(s.reader) and s.description
        if s.unlabeled_splits:
            assert "unlabeled" in s.description
        for d in s.derived_splits:
            assert d in s.splits
        if s.derivation is not None:
            assert "derived" in s.description and "seed 0" in s.description
    assert T.get_task("glue/cola").metric == "matthews_correlation"
    assert T.get_task("glue/mrpc").metric == "accuracy_f1_mean"
    assert {"accuracy", "f1"} <= set(T.get_task("glue/mrpc").metrics)
    assert T.get_task("glue/stsb").metric == "pearson" and T.get_task("glue/stsb").num_labels == 1
    assert T.get_task("conll2003").label_names[0] == "O" and T.get_task("conll2003").num_labels == 9
    wsc = T.get_task("superglue/wsc")
    assert (wsc.train_split, wsc.eval_split, wsc.test_split) == ("train32", "dev32", "val")
    cb = T.get_task("superglue/cb")
    assert (cb.train_split, cb.eval_split, cb.test_split) == ("train", "val", "val")


def test_describe_tasks_table():
    table = T.describe_tasks()
    for name in ALL_NAMES:
        assert name in table
    assert "matthews_correlation" in table and "test*" in table and "train+" in table


def test_unknown_task_and_aliases():
    with pytest.raises(T.UnknownTaskError) as ei:
        T.get_task("glue/sst3")
    assert isinstance(ei.value, ValueError) and "glue/sst2" in str(ei.value)
    with pytest.raises(T.UnknownTaskError) as ei:
        T.get_task("rte")  # ambiguous: both families
    assert "glue/rte" in ei.value.suggestions and "superglue/rte" in ei.value.suggestions
    assert T.get_task("glue/SST-2").name == "glue/sst2"
    assert T.get_task("sst2").name == "glue/sst2"
    assert T.get_task("super_glue/CB").name == "superglue/cb"
    with pytest.raises(UnknownSplitError, match="available splits"):
        T.get_task("glue/sst2").canonical_split("val32")
    assert T.get_task("glue/sst2").canonical_split("validation") == "dev"
    assert T.get_task("superglue/wsc").canonical_split("train") == "train32"
    assert T.get_task("conll2003").canonical_split("valid") == "dev"


# ---------------------------------------------------------------- data location
def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv(T.ENV_VAR, raising=False)
    d1, d2 = tmp_path / "a", tmp_path / "b"
    d1.mkdir()
    d2.mkdir()
    monkeypatch.setenv(T.ENV_VAR, str(d2))
    assert T.resolve_data_dir(d1) == d1.resolve()          # argument first
    assert T.resolve_data_dir() == d2.resolve()            # then the variable
    assert T.resolve_data_dir("hub") is None
    monkeypatch.setenv(T.ENV_VAR, "hub")
    assert T.resolve_data_dir() is None
    monkeypatch.setenv(T.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError):
        T.resolve_data_dir()
    with pytest.raises(DataNotFoundError):
        T.resolve_data_dir(tmp_path / "missing")


def test_search_walks_up_to_shared_data(tmp_path):
    repo = tmp_path / "clone" / "src" / "pkg"
    repo.mkdir(parents=True)
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "README.md").write_text("x")
    assert datadir_mod._search_from(repo) == shared


@needs_data
def test_default_resolution_finds_shared_data(monkeypatch):
    monkeypatch.delenv(T.ENV_VAR, raising=False)
    d = T.resolve_data_dir()
    assert d is not None and (d / "README.md").is_file() and (d / "glue" / "SST-2" / "dev.tsv").is_file()


def test_no_datasets_import_at_module_import():
    """``datasets`` is optional: no module of softprompt.tasks imports it at module level."""
    import ast

    pkg = Path(T.__file__).parent
    for f in pkg.glob("*.py"):
        tree = ast.parse(f.read_text())
        top = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        nested = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(fn)}
        for node in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] in ("datasets", "sklearn", "scipy", "torch") for n in names):
                assert id(node) in nested, f"{f.name}:{node.lineno} imports {names} at module level"


# ---------------------------------------------------------------- every task loads with the documented counts
@needs_data
@pytest.mark.parametrize("name,split", sorted(COUNTS))
def test_counts_and_schema(name, split):
    spec = T.get_task(name)
    recs = _load(name, split)
    assert len(recs) == COUNTS[(name, split)]
    unlabeled = split in spec.unlabeled_splits
    for r in recs:
        if spec.kind == "token_classification":
            assert len(r["tokens"]) == len(r["tags"]) > 0
            assert all(0 <= t < len(spec.label_names) for t in r["tags"])
            continue
        if spec.kind == "multiple_choice":
            assert isinstance(r["text"], str) and r["text"]
            assert len(r["choices"]) >= 2 and all(isinstance(c, str) for c in r["choices"])
            assert len(r["choices"]) <= len(spec.label_names)
            assert 0 <= r["label"] < len(r["choices"])
            continue
        assert isinstance(r["text"], str) and r["text"].strip()
        assert "text_pair" in r
        if unlabeled:
            assert r["label"] is None
        elif spec.kind == "regression":
            assert isinstance(r["label"], float) and 0.0 <= r["label"] <= 5.0
        else:
            assert isinstance(r["label"], int) and 0 <= r["label"] < len(spec.label_names)


@needs_data
def test_split_aliases_and_limit():
    assert len(_load("glue/sst2", "validation")) == 872
    assert len(_load("superglue/wsc", "train")) == 32  # train = train32 (FewGLUE)
    assert _load("superglue/wsc", "train") == _load("superglue/wsc", "train32")
    assert len(_load("glue/sst2", "train", limit=5)) == 5
    assert _load("glue/sst2", "dev", data_dir=DATA) == _load("glue/sst2", "dev")


@needs_data
def test_records_are_fresh_copies():
    a = _load("conll2003", "dev", limit=1)
    a[0]["tokens"].append("XXX")
    a[0]["text"] = "mutated"
    b = _load("conll2003", "dev", limit=1)
    assert "XXX" not in b[0]["tokens"] and "text" not in b[0]


@needs_data
def test_label_distributions_match_readme():
    assert _label_counts(_load("glue/cola", "train")) == {1: 6023, 0: 2528}
    assert _label_counts(_load("glue/cola", "dev")) == {1: 721, 0: 322}
    assert _label_counts(_load("glue/sst2", "train")) == {1: 37569, 0: 29780}
    assert _label_counts(_load("glue/sst2", "dev")) == {1: 444, 0: 428}
    assert _label_counts(_load("glue/mrpc", "train")) == {1: 2473, 0: 1194}
    assert _label_counts(_load("glue/mrpc", "dev")) == {1: 279, 0: 129}
    assert _label_counts(_load("glue/rte", "train")) == {0: 1249, 1: 1241}  # 0 = entailment
    assert _label_counts(_load("glue/rte", "dev")) == {0: 146, 1: 131}
    assert _label_counts(_load("glue/wnli", "train")) == {1: 312, 0: 323}
    assert _label_counts(_load("glue/wnli", "dev")) == {1: 31, 0: 40}
    assert _label_counts(_load("superglue/cb", "val")) == {0: 23, 1: 28, 2: 5}
    assert _label_counts(_load("superglue/boolq", "val")) == {1: 2033, 0: 1237}
    assert _label_counts(_load("superglue/wic", "val")) == {1: 319, 0: 319}
    assert _label_counts(_load("superglue/wsc", "train32")) == {1: 32}
    assert _label_counts(_load("agnews", "full")) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    assert _label_counts(_load("commonsense/piqa", "full")) == {0: 910, 1: 928}
    assert _label_counts(_load("commonsense/hellaswag", "full")) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}
    assert _label_counts(_load("commonsense/winogrande", "full")) == {0: 628, 1: 639}
    stsb = _load("glue/stsb", "dev")
    assert stsb[0]["label"] == 5.0 and stsb[1]["label"] == 4.75


@needs_data
def test_glue_first_rows_exact():
    cola = _load("glue/cola", "train")[0]
    assert cola["text"] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola["label"] == 1
    mrpc = _load("glue/mrpc", "train")[0]  # BOM stripped, header recognised
    assert mrpc["label"] == 1 and mrpc["text"].startswith("Amrozi accused his brother")
    assert mrpc["text_pair"].startswith("Referring to him as only")
    assert _load("glue/cola", "dev")[-1]["text"]  # no final newline in CoLA dev
    assert _load("glue/rte", "test")[0]["idx"] == 0


@needs_data
def test_conll_tokens_and_tags():
    tokens = {s: sum(len(r["tokens"]) for r in _load("conll2003", s)) for s in ("train", "dev", "test")}
    assert tokens == {"train": 203621, "dev": 51362, "test": 46435}
    first = _load("conll2003", "train")[0]
    names = T.get_task("conll2003").label_names
    assert first["tokens"][:3] == ["EU", "rejects", "German"]
    assert [names[t] for t in first["tags"]] == ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    assert not any(r["tokens"][0] == "-DOCSTART-" for r in _load("conll2003", "train"))


@needs_data
def test_multirc_flattening():
    recs = _load("superglue/multirc", "val")
    assert len({r["group"] for r in recs}) == 953
    assert len({r["group"].split("-")[0] for r in recs}) == 83
    assert all(r["text_pair"] and r["label"] in (0, 1) for r in recs)
    assert len({r["group"] for r in _load("superglue/multirc", "train32")}) == 32


@needs_data
def test_superglue_subsets_and_overlaps():
    def key(r):
        return (r["text"], r["text_pair"])
    for task in ("cb", "rte"):
        full = {key(r) for r in _load(f"superglue/{task}", "train")}
        for s in ("train32", "dev32"):
            assert {key(r) for r in _load(f"superglue/{task}", s)} <= full
    for task in ("cb", "rte", "boolq", "wic", "wsc", "multirc"):
        val = {key(r) for r in _load(f"superglue/{task}", "val")}
        for s in ("train32", "dev32"):
            assert not ({key(r) for r in _load(f"superglue/{task}", s)} & val)
    # same examples in the same order; the SuperGLUE jsonl lost some double quotes
    # (GLUE is read with QUOTE_NONE, so its quotes are kept)
    def unquoted(task):
        return [(r["text"].replace('"', ""), r["text_pair"].replace('"', ""), r["label"]) for r in _load(task, "train")]
    glue_rte, sg_rte = unquoted("glue/rte"), unquoted("superglue/rte")
    assert glue_rte == sg_rte
    assert sum('"' in r["text"] for r in _load("glue/rte", "train")) > sum(
        '"' in r["text"] for r in _load("superglue/rte", "train"))


@needs_data
def test_copa_wic_wsc_fields():
    copa = _load("superglue/copa", "val")[0]
    assert copa["text"] == "The man turned on the faucet. What was the effect?" and copa["label"] == 1
    assert copa["choices"] == ["The toilet filled with water.", "Water flowed from the spout."]
    wic = _load("superglue/wic", "val")[0]
    assert wic["word"] == "class" and wic["text"].startswith("class: ")
    wsc = _load("superglue/wsc", "val")[0]
    assert wsc["text_pair"] == '"him" refers to "anyone"'


@needs_data
def test_commonsense_parsing():
    arc = _load("commonsense/arc_easy", "train")
    numeric_src = [o for o in json.loads((DATA / "commonsense/arc_easy/train.json").read_text())
                   if o["choices"]["label"][0] == "1"]
    assert len(numeric_src) == 102
    by_id = {r["idx"]: r for r in arc}
    for o in numeric_src:
        r = by_id[o["id"]]
        assert r["label"] == o["choices"]["label"].index(o["answerKey"])
        assert r["choices"] == o["choices"]["text"]
    assert collections.Counter(len(r["choices"]) for r in arc)[5] == 4
    ch = _load("commonsense/arc_challenge", "test")
    assert set(ch[0]) == {"idx", "text", "choices", "label"}  # answer/response dropped
    obqa = {r["idx"]: r for r in _load("commonsense/openbookqa", "train")}
    odd = obqa["12-1145"]  # choice D contains a literal "(D)"
    assert len(odd["choices"]) == 4 and odd["label"] == 1
    assert odd["choices"][3] == "baby birds chewing worms (D) mother dogs nursing their pups"
    first = _load("commonsense/openbookqa", "dev")[0]
    assert first["choices"] == ["Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"] and first["label"] == 0
    hs = _load("commonsense/hellaswag", "full")[0]
    assert hs["text"] == "Roof shingle removal: A man is sitting on a roof. he" and hs["label"] == 3
    assert hs["choices"][3] == "starts pulling up roofing on a roof."
    wg = _load("commonsense/winogrande", "full")[0]
    assert wg["choices"] == ["Sarah", "Maria"] and wg["label"] == 1 and "_" in wg["text"]


# ---------------------------------------------------------------- derived splits
DERIVED = ["agnews", "commonsense/arc_challenge", "commonsense/piqa", "commonsense/hellaswag",
           "commonsense/winogrande"]

# sha256 of json.dumps(derived_split_indices(name), sort_keys=True): pins the documented rule
PINNED: dict[str, str] = {
    "agnews": "8f6e56a15c8553eb5d9374e7d6a1d1697fc619be4ffb45f56d0f06cb5a141d0e",
    "commonsense/arc_challenge": "685029b7bfc304adf60015220277fe3ba28c887dffc974cc4e780c0daee75cf3",
    "commonsense/piqa": "e819d49a440250e82cdcc0ff5699f16a80ac5b5caa67893fdb9d1b127ca715fc",
    "commonsense/hellaswag": "618161248878162cda7fcbd242c3456fa7930cdf83b85ceaf2ddd8424872f70b",
    "commonsense/winogrande": "b985a1a337dacb9a9c0f9d3bf6de7dcb8134f511f299e7591913de0019680621",
}


@needs_data
@pytest.mark.parametrize("name", DERIVED)
def test_derived_splits_deterministic_disjoint_complete(name):
    spec = T.get_task(name)
    idx = T.derived_split_indices(name)
    assert list(idx) == list(spec.derived_splits)
    n = COUNTS[(name, spec.derivation.source)]
    seen = set()
    for split, ix in idx.items():
        assert ix == sorted(ix) and len(ix) == COUNTS[(name, split)]
        assert not (seen & set(ix))
        seen |= set(ix)
    assert seen == set(range(n))
    T.clear_cache()
    from softprompt.tasks import registry
    registry._derived_cached.cache_clear()
    assert T.derived_split_indices(name) == idx  # recomputed from scratch
    other = T.derived_split_indices(name, seed=1)
    assert other != idx and {k: len(v) for k, v in other.items()} == {k: len(v) for k, v in idx.items()}
    source = _load(name, spec.derivation.source)
    for split, ix in idx.items():
        assert _load(name, split) == [source[i] for i in ix]
    digest = hashlib.sha256(json.dumps(idx, sort_keys=True).encode()).hexdigest()
    assert digest == PINNED[name], "derived split indices changed: the documented split rule must stay fixed"


@needs_data
def test_agnews_stratified():
    for split, per_class in (("train", 1520), ("dev", 190), ("test", 190)):
        assert _label_counts(_load("agnews", split)) == {c: per_class for c in range(4)}


@needs_data
def test_save_split_indices(tmp_path):
    p = T.save_split_indices("commonsense/piqa", tmp_path)
    obj = json.loads(p.read_text())
    assert obj["task"] == "commonsense/piqa" and obj["seed"] == 0 and obj["n_source"] == 1838
    assert obj["splits"] == T.derived_split_indices("commonsense/piqa")
    assert T.derived_split_indices("glue/sst2") == {}


# ---------------------------------------------------------------- Hub fallback
def test_hub_missing_datasets_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(HubUnavailableError, match="datasets"):
        T.load_split("glue/sst2", "dev", data_dir="hub")


def test_hub_split_without_counterpart():
    with pytest.raises(HubUnavailableError, match="offline data"):
        T.load_split("superglue/boolq", "train32", data_dir="hub")


def _fake_datasets(monkeypatch, tables):
    calls = []

    def load_dataset(*args, split):
        calls.append((args, split))
        key = (args, split)
        if key not in tables:
            raise ConnectionError("offline")
        return list(tables[key])

    mod = types.ModuleType("datasets")
    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)
    return calls


def test_hub_mapping_with_fake_datasets(monkeypatch):
    tables = {
        (("nyu-mll/glue", "sst2"), "validation"): [{"sentence": "good .", "label": 1, "idx": 0},
                                                   {"sentence": "bad .", "label": 0, "idx": 1}],
        (("nyu-mll/glue", "stsb"), "test"): [{"sentence1": "a", "sentence2": "b", "label": -1.0, "idx": 0}],
        (("aps/super_glue", "multirc"), "validation"): [
            {"paragraph": "P", "question": "Q?", "answer": "A", "idx": {"paragraph": 0, "question": 1, "answer": 2},
             "label": 1}],
        (("eriktks/conll2003",), "train"): [{"id": "0", "tokens": ["EU", "rejects"], "pos_tags": [1, 2],
                                             "chunk_tags": [1, 2], "ner_tags": [3, 0]}],
        (("fancyzhx/ag_news",), "test"): [{"text": f"t{i}", "label": i % 4} for i in range(40)],
        (("allenai/winogrande", "winogrande_xl"), "validation"): [
            {"sentence": "A _ b", "option1": "x", "option2": "y", "answer": "2"}],
    }
    calls = _fake_datasets(monkeypatch, tables)
    assert T.load_split("glue/sst2", "dev", data_dir="hub") == [
        {"idx": 0, "text": "good .", "text_pair": None, "label": 1},
        {"idx": 1, "text": "bad .", "text_pair": None, "label": 0}]
    assert T.load_split("glue/stsb", "test", data_dir="hub")[0]["label"] is None
    assert T.load_split("superglue/multirc", "val", data_dir="hub") == [
        {"idx": "0-1-2", "group": "0-1", "text": "P", "text_pair": "Q? A", "label": 1}]
    assert T.load_split("conll2003", "train", data_dir="hub")[0]["tags"] == [3, 0]
    ag = T.load_split("agnews", "test", data_dir="hub")
    assert len(ag) == 4 and _label_counts(ag) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert T.load_split("commonsense/winogrande", "full", data_dir="hub")[0]["label"] == 1
    assert (("nyu-mll/glue", "sst2"), "validation") in calls
    with pytest.raises(HubUnavailableError, match="offline"):
        T.load_split("glue/cola", "dev", data_dir="hub")


def test_missing_local_file_is_clear(tmp_path):
    with pytest.raises(DataNotFoundError, match="SST-2"):
        T.load_split("glue/sst2", "dev", data_dir=tmp_path)
