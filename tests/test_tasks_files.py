"""Malformed-row handling of the readers and loading of users' own files (temporary files only)."""
from __future__ import annotations

import bz2
import json
import warnings

import pytest

from softprompt import tasks as T
from softprompt.tasks.errors import MalformedRowError, MalformedRowWarning, MissingColumnError


def _w(path, text, mode="w"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "bz2":
        with bz2.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _load_warn(*args, **kw):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = T.load_split(*args, **kw)
    msgs = [w for w in rec if issubclass(w.category, MalformedRowWarning)]
    return out, msgs


# ---------------------------------------------------------------- readers: skip + one warning, or strict
def test_glue_tsv_malformed(tmp_path):
    _w(tmp_path / "glue/SST-2/dev.tsv",
       "sentence\tlabel\ngood film\t1\nno label column here\nbad label\t7\nfine\t0\n")
    recs, msgs = _load_warn("glue/sst2", "dev", data_dir=tmp_path)
    assert [r["text"] for r in recs] == ["good film", "fine"] and [r["label"] for r in recs] == [1, 0]
    assert len(msgs) == 1
    msg = str(msgs[0].message)
    assert "2 malformed" in msg and "line 3" in msg and "dev.tsv" in msg
    with pytest.raises(T.MalformedRowError) as ei:
        T.load_split("glue/sst2", "dev", data_dir=tmp_path, strict=True)
    err = ei.value
    assert isinstance(err, ValueError) and err.line == 3 and err.path.endswith("dev.tsv")
    assert "expected 2 tab-separated columns" in err.problem and "line 3" in str(err)


def test_glue_quote_none_and_bom(tmp_path):
    _w(tmp_path / "glue/MRPC/dev.tsv",
       "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
       '1\t1\t2\tHe said " hi .\t" Hi , " he said .\n')
    recs = T.load_split("glue/mrpc", "dev", data_dir=tmp_path, strict=True)
    assert recs == [{"idx": 0, "text": 'He said " hi .', "text_pair": '" Hi , " he said .', "label": 1}]


def test_stsb_score_range(tmp_path):
    hdr = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _w(tmp_path / "glue/STS-B/dev.tsv", hdr + "0\tg\tf\ty\t0\tn\tn\ta\tb\t3.5\n1\tg\tf\ty\t0\tn\tn\ta\tb\t7\n"
       "2\tg\tf\ty\t0\tn\tn\ta\tb\tx\n")
    recs, msgs = _load_warn("glue/stsb", "dev", data_dir=tmp_path)
    assert [r["label"] for r in recs] == [3.5] and "2 malformed" in str(msgs[0].message)


def test_jsonl_malformed(tmp_path):
    good = {"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}
    lines = [json.dumps(good), "{not json", "", json.dumps({"premise": "p", "label": "neutral"}),
             json.dumps({**good, "label": "maybe"}), json.dumps({**good, "idx": 4})]
    _w(tmp_path / "superglue/CB/val.jsonl", "\n".join(lines) + "\n")
    recs, msgs = _load_warn("superglue/cb", "val", data_dir=tmp_path)
    assert [r["idx"] for r in recs] == [0, 4] and recs[0]["label"] == 2
    assert len(msgs) == 1 and "3 malformed" in str(msgs[0].message) and "line 2" in str(msgs[0].message)
    with pytest.raises(T.MalformedRowError, match=r"val\.jsonl, line 2: invalid JSON"):
        T.load_split("superglue/cb", "val", data_dir=tmp_path, strict=True)


def test_multirc_bad_passage_skipped_whole(tmp_path):
    ok = {"idx": 0, "passage": {"text": "T", "questions": [
        {"question": "Q", "idx": 0,
         "answers": [{"text": "a", "idx": 0, "label": 1}, {"text": "b", "idx": 1, "label": 0}]}]}}
    bad = {"idx": 1, "passage": {"text": "T", "questions": [
        {"question": "Q", "idx": 1, "answers": [{"text": "a", "idx": 2, "label": 1}, {"text": "b", "idx": 3}]}]}}
    _w(tmp_path / "superglue/MultiRC/val.jsonl", json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    recs, msgs = _load_warn("superglue/multirc", "val", data_dir=tmp_path)
    assert [r["idx"] for r in recs] == ["0-0-0", "0-0-1"] and "missing field 'label'" in str(msgs[0].message)


def test_conll_malformed(tmp_path):
    _w(tmp_path / "conll2003/valid.txt",
       "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
       "Peter NNP B-NP B-PERSON\nBlackburn NNP I-NP I-PER\n\nBRUSSELS NNP\n\nOK NN B-NP O\n")
    recs, msgs = _load_warn("conll2003", "dev", data_dir=tmp_path)
    assert recs == [{"idx": 0, "tokens": ["EU", "rejects"], "tags": [3, 0]}, {"idx": 1, "tokens": ["OK"], "tags": [0]}]
    assert "2 malformed" in str(msgs[0].message) and "line 6" in str(msgs[0].message)
    with pytest.raises(T.MalformedRowError, match="unknown NER tag 'B-PERSON'"):
        T.load_split("conll2003", "valid", data_dir=tmp_path, strict=True)


def test_hellaswag_malformed(tmp_path):
    item = "Act: ctx\n{}\ne0\ne1\ne2\ne3\n"
    _w(tmp_path / "commonsense/hellaswag/hellaswag_val_full.txt.bz2",
       item.format(1) + item.format(9) + item.format(2) + "Act: partial\n0\n", mode="bz2")
    recs, msgs = _load_warn("commonsense/hellaswag", "full", data_dir=tmp_path)
    assert [r["label"] for r in recs] == [1, 2] and recs[0]["choices"] == ["e0", "e1", "e2", "e3"]
    assert "2 malformed" in str(msgs[0].message) and "line 7" in str(msgs[0].message)


def test_json_array_items_and_piqa_labels(tmp_path):
    items = [{"id": "a", "question": "q", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"},
             {"id": "b", "question": "q", "choices": {"text": ["x", "y"], "label": ["A", "B"]}}]
    _w(tmp_path / "commonsense/arc_easy/validation.json", json.dumps(items))
    recs, msgs = _load_warn("commonsense/arc_easy", "dev", data_dir=tmp_path)
    assert recs == [{"idx": "a", "text": "q", "choices": ["x", "y"], "label": 1}]
    assert "item 2" in str(msgs[0].message) and "answerKey" in str(msgs[0].message)
    with pytest.raises(T.MalformedRowError) as ei:
        T.load_split("commonsense/arc_easy", "validation", data_dir=tmp_path, strict=True)
    assert ei.value.unit == "item" and ei.value.line == 2
    _w(tmp_path / "commonsense/piqa/valid.jsonl",
       "\n".join(json.dumps({"goal": f"g{i}", "sol1": "a", "sol2": "b"}) for i in range(3)) + "\n")
    _w(tmp_path / "commonsense/piqa/valid-labels.lst", "0\n5\n")
    recs, msgs = _load_warn("commonsense/piqa", "full", data_dir=tmp_path)
    assert [r["text"] for r in recs] == ["g0"] and "2 malformed" in str(msgs[0].message)


def test_agnews_csv_malformed(tmp_path):
    _w(tmp_path / "agnews/test.csv",
       'Class Index,Title,Description\n3,"T, with comma","multi\nline"\n5,x,y\n1,a\n2,b,c\n')
    recs, msgs = _load_warn("agnews", "full", data_dir=tmp_path)
    assert [(r["text"], r["label"]) for r in recs] == [("T, with comma multi\nline", 2), ("b c", 1)]
    assert "2 malformed" in str(msgs[0].message) and "line 4" in str(msgs[0].message)


def test_cache_invalidated_on_change(tmp_path):
    p = _w(tmp_path / "glue/SST-2/dev.tsv", "sentence\tlabel\na\t1\n")
    assert len(T.load_split("glue/sst2", "dev", data_dir=tmp_path)) == 1
    import os
    p.write_text("sentence\tlabel\na\t1\nb\t0\n")
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert len(T.load_split("glue/sst2", "dev", data_dir=tmp_path)) == 2


# ---------------------------------------------------------------- user files
def test_user_csv_string_labels(tmp_path):
    p = _w(tmp_path / "mine.csv", 'review,other,sentiment\n"great, really",x,pos\nawful,y,neg\nmeh,z,pos\n')
    recs, spec = T.load_file(p, text_column="review", text_pair_column="other", label_column="sentiment")
    assert spec.label_names == ["neg", "pos"] and spec.kind == "classification" and spec.metric == "accuracy"
    assert [(r["text"], r["text_pair"], r["label"]) for r in recs] == [
        ("great, really", "x", 1), ("awful", "y", 0), ("meh", "z", 1)]
    recs2, spec2 = T.load_file(p, text_column="review", label_column="sentiment", label_names=["pos", "neg"])
    assert [r["label"] for r in recs2] == [0, 1, 0] and spec2.label_names == ["pos", "neg"]
    assert T.compute_metrics(spec, [1, 0, 0], [r["label"] for r in recs])["accuracy"] == pytest.approx(2 / 3)


def test_user_missing_column(tmp_path):
    p = _w(tmp_path / "mine.csv", "review,sentiment\ngood,pos\n")
    with pytest.raises(MissingColumnError) as ei:
        T.load_file(p, text_column="sentence", label_column="sentiment")
    msg = str(ei.value)
    assert "'sentence'" in msg and "'review'" in msg and "'sentiment'" in msg and isinstance(ei.value, ValueError)
    with pytest.raises(MissingColumnError, match="label_column 'label'"):
        T.load_file(p, text_column="review", label_column="label")
    # A file of only a header is checked too: the misspelt column is the problem to name, not the missing rows.
    h = _w(tmp_path / "header.csv", "review,sentiment\n")
    with pytest.raises(MissingColumnError, match="text_column 'sentence'"):
        T.load_file(h, text_column="sentence", label_column="sentiment")
    # Without a label set, a row with an extra field is malformed (else its 2nd field would become a class).
    extra = _w(tmp_path / "extra.csv", "review,sentiment\ngood,pos\nbad, so bad,neg\nfine,pos\nawful,neg\n")
    with pytest.raises(MalformedRowError, match="line 3: expected 2 columns, found 3"):
        T.load_file(extra, text_column="review", label_column="sentiment", strict=True)


def test_user_jsonl_regression_and_ints(tmp_path):
    rows = [{"t": "a", "y": 0.5}, {"t": "b", "y": 2}, {"t": "c", "y": "1.25"}]
    p = _w(tmp_path / "reg.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    recs, spec = T.load_file(p, text_column="t", label_column="y")
    assert spec.kind == "regression" and spec.metric == "pearson" and spec.num_labels == 1
    assert [r["label"] for r in recs] == [0.5, 2.0, 1.25]
    rows = [{"t": "a", "y": 4}, {"t": "b", "y": 1}, {"t": "c", "y": "2"}, {"t": "d", "y": 1.0}]
    p = _w(tmp_path / "cls.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    recs, spec = T.load_file(p, text_column="t", label_column="y")
    assert spec.kind == "classification" and spec.label_names == ["1", "2", "4"]
    assert [r["label"] for r in recs] == [2, 0, 1, 0]
    rows = [{"t": "a", "y": True}, {"t": "b", "y": False}]
    p = _w(tmp_path / "bool.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    recs, spec = T.load_file(p, text_column="t", label_column="y")
    assert spec.label_names == ["False", "True"] and [r["label"] for r in recs] == [1, 0]


def test_user_malformed_rows_and_strict(tmp_path):
    p = _w(tmp_path / "m.jsonl",
           '{"t": "a", "y": "x"}\n{"t": "", "y": "x"}\nnot json\n{"t": "b"}\n{"t": "c", "y": "z"}\n')
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        recs, spec = T.load_file(p, text_column="t", label_column="y")
    assert [r["text"] for r in recs] == ["a", "c"] and spec.label_names == ["x", "z"]
    ws = [w for w in rec if issubclass(w.category, MalformedRowWarning)]
    assert len(ws) == 1 and "3 malformed" in str(ws[0].message) and "line 2" in str(ws[0].message)
    with pytest.raises(T.MalformedRowError, match="line 2"):
        T.load_file(p, text_column="t", label_column="y", strict=True)
    with pytest.raises(T.MalformedRowError, match="not in label_names"):
        T.load_file(_w(tmp_path / "l.csv", "t,y\na,x\nb,w\n"), text_column="t", label_column="y",
                    label_names=["x"], strict=True)


def test_user_tsv_txt_json_array(tmp_path):
    recs, spec = T.load_file(_w(tmp_path / "a.tsv", 'text\tlabel\nsays "hi\tb\nok\ta\n'), label_column="label")
    assert recs[0]["text"] == 'says "hi' and [r["label"] for r in recs] == [1, 0]
    recs, spec = T.load_file(_w(tmp_path / "a.txt", "first line\n\nsecond, line\n"))
    assert [r["text"] for r in recs] == ["first line", "second, line"] and all(r["label"] is None for r in recs)
    assert spec.unlabeled_splits == ("all",)
    recs, spec = T.load_file(_w(tmp_path / "a.json", json.dumps([{"s": "x", "l": "b"}, {"s": "y", "l": "a"}])),
                             text_column="s", label_column="l")
    assert [r["label"] for r in recs] == [1, 0]
    with pytest.raises(ValueError, match="unsupported"):
        T.load_file(_w(tmp_path / "a.xlsx", "x"))
