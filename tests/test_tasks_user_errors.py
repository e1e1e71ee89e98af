"""User files that cannot make a task: one clear error naming the file, the problem and the fix."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest

from softprompt import tasks
from softprompt.tasks import LabelError, MalformedRowError, NoDataError, TaskError

MIXED = "text,label\na,1\nb,1.0\nc,True\nd,pos\ne,0\nf,False\ng,neg\nh,1\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes (loading must never write anything)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize(("name", "content", "expect"), [
    ("h.csv", "text,label\n", "no data rows, only a header line; add one example per row below the header"),
    ("h.tsv", "text\tlabel\n\n", "no data rows, only a header line"),
    ("e.jsonl", "\n\n", "holds no JSON object; write one object per line"),
    ("e.json", "[]", "holds no JSON object"),
    ("e.txt", "\n  \n", "has no non-blank line; write one text per line"),
])
def test_file_without_examples_names_the_file_and_the_fix(tmp_path, name, content, expect) -> None:
    f = _write(tmp_path / name, content)
    before = _tree(tmp_path)
    kw = {} if name.endswith(".txt") else {"label_column": "label"}
    with pytest.raises(NoDataError) as err:
        tasks.load_file(f, **kw)
    msg = _one_line(err.value)
    assert msg.startswith(f"{f}: ") and expect in msg
    assert isinstance(err.value, TaskError) and isinstance(err.value, ValueError)  # the CLI's one-line handler
    assert _tree(tmp_path) == before


def test_file_whose_rows_are_all_malformed(tmp_path) -> None:
    f = _write(tmp_path / "bad.csv", "text,label\n,pos\nx\n")
    with pytest.raises(NoDataError) as err:
        tasks.load_file(f, label_column="label")
    msg = _one_line(err.value)
    assert f"{f}: no usable example: all 2 row(s) are malformed (first at line 2: empty value in column 'text')" in msg
    # strict keeps its meaning: the first malformed row is the error.
    with pytest.raises(MalformedRowError, match="line 2"):
        tasks.load_file(f, label_column="label", strict=True)


def test_mixed_label_types_list_every_value_and_name_the_label_map(tmp_path) -> None:
    f = _write(tmp_path / "mixed.csv", MIXED)
    before = _tree(tmp_path)
    with pytest.raises(LabelError) as err:
        tasks.load_file(f, label_column="label")
    msg = _one_line(err.value)
    assert msg.startswith(f"{f}: label column 'label' mixes numbers, booleans and text (7 distinct values")
    for value in ("'1' (2)", "'1.0' (1)", "'0' (1)", "'True' (1)", "'False' (1)", "'pos' (1)", "'neg' (1)"):
        assert value in msg
    assert "--label-map (Python: label_map=" in msg and "strict=True" not in msg
    assert _tree(tmp_path) == before
    # JSON values are checked the same way: true next to 1 is a mix.
    j = _write(tmp_path / "m.jsonl", "\n".join(json.dumps({"text": t, "label": v}) for t, v in
                                              (("a", 1), ("b", True), ("c", 0), ("d", False))) + "\n")
    with pytest.raises(LabelError, match="mixes numbers and booleans"):
        tasks.load_file(j, label_column="label")


def test_label_map_resolves_a_mixed_column(tmp_path) -> None:
    f = _write(tmp_path / "mixed.csv", MIXED)
    recs, spec = tasks.load_file(f, label_column="label", label_map={
        "1": "pos", "1.0": "pos", "True": "pos", "0": "neg", "False": "neg"})
    assert spec.label_names == ["neg", "pos"] and spec.kind == "classification"
    assert [r["label"] for r in recs] == [1, 1, 1, 1, 0, 0, 0, 1]
    # Keys may be given as Python values; values the map leaves out stay as they are (here: already numbers).
    recs, spec = tasks.load_file(f, label_column="label", label_map={True: 1, "pos": 1, False: 0, "neg": 0})
    assert spec.label_names == ["0", "1"] and [r["label"] for r in recs] == [1, 1, 1, 1, 0, 0, 0, 1]
    # The map also applies before a fixed label set.
    recs, _ = tasks.load_file(f, label_column="label", label_names=["neg", "pos"],
                              label_map={"1.0": "pos", "True": "pos", "False": "neg"})
    assert [r["label"] for r in recs] == [1, 1, 1, 1, 0, 0, 0, 1]
    # JSON values are matched as the docstring spells them: true is "True", 1.0 is "1.0", 0 is "0".
    j = _write(tmp_path / "m.jsonl", "\n".join(json.dumps({"text": t, "label": v}) for t, v in
                                              (("a", True), ("b", 1.0), ("c", 0), ("d", False))) + "\n")
    recs, spec = tasks.load_file(j, label_column="label", label_map={"True": "pos", "1.0": "pos", "0": "neg",
                                                                      "False": "neg"})
    assert spec.label_names == ["neg", "pos"] and [r["label"] for r in recs] == [1, 1, 0, 0]
    # A map that leaves the column mixed is refused again, listing what is left.
    with pytest.raises(LabelError, match=r"mixes numbers and text .*'pos' \(1\)"):
        tasks.load_file(f, label_column="label", label_map={"True": "1", "False": "0"})


def test_bad_label_maps_are_refused(tmp_path) -> None:
    f = _write(tmp_path / "ok.csv", "text,label\na,x\nb,y\n")
    with pytest.raises(LabelError, match=r"label_map\['x'\] = \['a'\]: each value must be a class name"):
        tasks.load_file(f, label_column="label", label_map={"x": ["a"]})
    with pytest.raises(LabelError, match="label_map must be a dict"):
        tasks.load_file(f, label_column="label", label_map=[("x", "y")])
    with pytest.raises(LabelError, match="label_map needs a label column"):
        tasks.load_file(f, label_map={"x": "y"})


@pytest.mark.parametrize(("name", "content", "value"), [
    ("one.csv", "text,label\na,pos\nb,pos\nc, pos\n", "'pos' in 3 row(s)"),
    ("one.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1.0}\n', "'1' in 2 row(s)"),
])
def test_fewer_than_two_classes_is_an_error(tmp_path, name, content, value) -> None:
    f = _write(tmp_path / name, content)
    before = _tree(tmp_path)
    with pytest.raises(LabelError) as err:
        tasks.load_file(f, label_column="label")
    msg = _one_line(err.value)
    assert msg.startswith(f"{f}: label column 'label' has 1 distinct value ({value})")
    assert "needs at least 2 classes" in msg and "label_names=" in msg
    assert _tree(tmp_path) == before
    # Scoring such a file with a model's label set stays possible.
    recs, spec = tasks.load_file(f, label_column="label", label_names=["neg", "pos"] if name.endswith("csv")
                                 else ["0", "1"])
    assert len(spec.label_names) == 2 and {r["label"] for r in recs} == {1}


def test_malformed_row_warning_names_the_cli_flag_and_the_python_argument(tmp_path) -> None:
    f = _write(tmp_path / "w.csv", "text,label\na,pos\n,neg\nb,neg\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tasks.load_file(f, label_column="label")
    (w,) = [str(c.message) for c in caught if issubclass(c.category, tasks.MalformedRowWarning)]
    assert "(to fail instead: --strict, Python: strict=True)" in w
