"""Registry tests, where the offline data is found (softprompt.tasks.resolve_data_dir) and the Hub fallback; the
real offline data itself: test_tasks_data.py."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from _helpers.tasks import _label_counts, needs_data

from softprompt import tasks as T
from softprompt.tasks import datadir as datadir_mod
from softprompt.tasks.errors import DataNotFoundError, HubUnavailableError, UnknownSplitError

ALL_NAMES = [
    "glue/cola", "glue/sst2", "glue/mrpc", "glue/rte", "glue/stsb", "glue/wnli",
    "superglue/cb", "superglue/rte", "superglue/boolq", "superglue/copa", "superglue/multirc", "superglue/wic",
    "superglue/wsc", "agnews", "conll2003", "commonsense/arc_easy", "commonsense/arc_challenge",
    "commonsense/openbookqa", "commonsense/piqa", "commonsense/hellaswag", "commonsense/winogrande",
]


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
