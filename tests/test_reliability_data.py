"""Issue 10, data bullet: malformed rows in user files are counted and reported with line numbers,
``strict=True`` fails on the first, nothing is silently dropped; Latin-1 / BOM files are read or rejected clearly."""

import re
import warnings

import pytest

from softprompt.tasks import load_file
from softprompt.tasks.errors import MalformedRowError, MalformedRowWarning

LABELS = ["neg", "pos"]


def _load(path, **kw):
    """Load with warnings recorded; returns (records, n_bad, warning text or '')."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records, _ = load_file(path, **kw)
    msgs = [str(w.message) for w in caught if issubclass(w.category, MalformedRowWarning)]
    assert len(msgs) <= 1, msgs  # one warning per load
    if not msgs:
        return records, 0, ""
    n_bad = int(re.search(r"skipped (\d+) malformed row", msgs[0]).group(1))
    return records, n_bad, msgs[0]


def _reported_lines(msg):
    return [int(x) for x in re.search(r"malformed (?:line|item)s: ([\d, ]+)", msg).group(1).strip(", ").split(", ")]


# Each file: header, 1 good row, then one malformed row of each kind, then 1 good row.
CSV = (
    "text,label\n"
    "fine film,pos\n"          # line 2 ok
    "no label here,\n"          # line 3 missing label
    "odd one,maybe\n"           # line 4 label outside label_names
    ",neg\n"                    # line 5 empty text
    "   ,pos\n"                 # line 6 blank text
    "too,many,fields\n"         # line 7 wrong column count
    "awful film,neg\n"          # line 8 ok
)

JSONL = (
    b'{"text": "fine film", "label": "pos"}\n'        # 1 ok
    b'{"text": "no label here"}\n'                     # 2 missing label
    b'{"text": "odd one", "label": "maybe"}\n'         # 3 outside label set
    b'{"text": "", "label": "neg"}\n'                  # 4 empty text
    b'{"text": "caf\xe9 latin-1", "label": "pos"}\n'   # 5 invalid UTF-8
    b'{"text": "broken json", "label": \n'             # 6 invalid JSON
    b'["not", "an", "object"]\n'                        # 7 not an object
    b'{"text": null, "label": "pos"}\n'                # 8 null text
    b'{"text": "awful film", "label": "neg"}\n'        # 9 ok
)


def test_csv_malformed_rows_counted_with_line_numbers(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text(CSV, encoding="utf-8")
    records, n_bad, msg = _load(f, label_column="label", label_names=LABELS)
    assert [r["text"] for r in records] == ["fine film", "awful film"]
    assert n_bad == 5
    assert len(records) + n_bad == CSV.count("\n") - 1  # nothing silently dropped (header excluded)
    assert str(f) in msg and "first at line 3" in msg and "missing label" in msg
    assert _reported_lines(msg) == [3, 4, 5, 6, 7]


def test_csv_strict_fails_on_first_malformed_row(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text(CSV, encoding="utf-8")
    with pytest.raises(MalformedRowError) as err:
        load_file(f, label_column="label", label_names=LABELS, strict=True)
    assert err.value.path == str(f) and err.value.line == 3
    assert str(f) in str(err.value) and "line 3" in str(err.value) and "missing label" in str(err.value)


@pytest.mark.parametrize("line,row,problem", [
    (2, "odd one,maybe", "not in label_names"),
    (2, ",neg", "empty value in column 'text'"),
    (2, "x,", "missing label"),
    (2, "x,2", "label '2' not in label_names"),  # an id is read only inside 0..len(label_names)-1
    (2, "x,-1", "label '-1' not in label_names"),
    # An unquoted comma in the text: a column too many, never a silent split into text and label.
    (2, "awful, really awful,neg", "expected 2 columns, found 3"),
])
def test_csv_strict_names_each_kind(tmp_path, line, row, problem):
    f = tmp_path / "one.csv"
    f.write_text(f"text,label\n{row}\ngood,pos\n", encoding="utf-8")
    with pytest.raises(MalformedRowError, match=re.escape(f"{f}, line {line}: ") + ".*" + re.escape(problem)):
        load_file(f, label_column="label", label_names=LABELS, strict=True)


def test_jsonl_malformed_rows_counted_with_line_numbers(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(JSONL)
    records, n_bad, msg = _load(f, label_column="label", label_names=LABELS)
    assert [r["text"] for r in records] == ["fine film", "awful film"]
    assert n_bad == 7
    assert len(records) + n_bad == JSONL.count(b"\n")
    assert _reported_lines(msg) == [2, 3, 4, 5, 6, 7, 8]
    assert "first at line 2" in msg and "missing label" in msg


def test_jsonl_strict_fails_on_first(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(JSONL)
    with pytest.raises(MalformedRowError) as err:
        load_file(f, label_column="label", label_names=LABELS, strict=True)
    assert (err.value.path, err.value.line) == (str(f), 2)


def test_jsonl_invalid_utf8_line_reported(tmp_path):
    f = tmp_path / "enc.jsonl"
    f.write_bytes(b'{"text": "ok", "label": "pos"}\n{"text": "caf\xe9", "label": "neg"}\n')
    records, n_bad, msg = _load(f, label_column="label", label_names=LABELS)
    assert len(records) == 1 and n_bad == 1
    assert "line 2" in msg and "not valid UTF-8" in msg
    with pytest.raises(MalformedRowError, match=r"line 2: not valid UTF-8"):
        load_file(f, label_column="label", label_names=LABELS, strict=True)


def test_txt_invalid_utf8_line_counted(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"hello\ncaf\xe9\nworld\n")
    records, n_bad, msg = _load(f)
    assert [r["text"] for r in records] == ["hello", "world"]
    assert n_bad == 1 and _reported_lines(msg) == [2]


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_latin1_table_rejected_with_clear_message(tmp_path, suffix, sep):
    # A CSV/TSV is decoded as a whole (quoted fields may span lines), so a Latin-1 file is rejected, not
    # half-read: the error names the file, the first bad line and the fix; never a raw UnicodeDecodeError.
    f = tmp_path / f"latin{suffix}"
    f.write_bytes(f"text{sep}label\nplain{sep}pos\ncafé{sep}neg\n".encode("latin-1"))
    for strict in (False, True):
        with pytest.raises(MalformedRowError) as err:
            load_file(f, label_column="label", label_names=LABELS, strict=strict)
        assert err.value.line == 3 and str(f) in str(err.value)
        assert "not valid UTF-8" in str(err.value) and "re-save the file as UTF-8" in str(err.value)


def test_latin1_jsonl_lines_counted(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes('{"text": "café", "label": "pos"}\n{"text": "plain", "label": "neg"}\n'.encode("latin-1"))
    records, n_bad, msg = _load(f, label_column="label", label_names=LABELS)
    assert [r["text"] for r in records] == ["plain"] and n_bad == 1 and _reported_lines(msg) == [1]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".txt"])
def test_utf8_bom_read_correctly(tmp_path, suffix):
    f = tmp_path / f"bom{suffix}"
    if suffix == ".csv":
        body = "text,label\ncafé,pos\nbad,neg\n"
    elif suffix == ".tsv":
        body = "text\tlabel\ncafé\tpos\nbad\tneg\n"
    elif suffix == ".jsonl":
        body = '{"text": "café", "label": "pos"}\n{"text": "bad", "label": "neg"}\n'
    elif suffix == ".json":
        body = '[{"text": "café", "label": "pos"}, {"text": "bad", "label": "neg"}]'
    else:
        body = "café\nbad\n"
    f.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    kw = {} if suffix == ".txt" else {"label_column": "label", "label_names": LABELS}
    records, n_bad, msg = _load(f, **kw)
    assert n_bad == 0 and msg == ""
    assert [r["text"] for r in records] == ["café", "bad"]  # BOM is not part of the first header / text
    if suffix != ".txt":
        assert [r["label"] for r in records] == [1, 0]


def test_many_bad_rows_line_list_is_capped(tmp_path):
    f = tmp_path / "many.csv"
    f.write_text("text,label\n" + "".join(f"t{i},\n" for i in range(30)) + "ok,pos\n", encoding="utf-8")
    records, n_bad, msg = _load(f, label_column="label", label_names=LABELS)
    assert len(records) == 1 and n_bad == 30
    assert "(10 more)" in msg and _reported_lines(msg)[:3] == [2, 3, 4]


def test_clean_file_emits_no_warning(tmp_path):
    f = tmp_path / "clean.csv"
    f.write_text("text,label\na,pos\nb,neg\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records, _ = load_file(f, label_column="label", label_names=LABELS, strict=True)
    assert len(records) == 2


def test_cli_strict_fails_on_first_malformed_row(tiny_bert_dir, tmp_path, capsys):
    from softprompt.cli import main

    f = tmp_path / "bad.csv"
    f.write_text("sentence,sentiment\nthe film was good,pos\nthe film was bad,\nthe movie was fine,pos\n"
                 "the movie was awful,neg\n", encoding="utf-8")
    argv = ["train", "--method", "prompt", "--model", tiny_bert_dir, "--file", str(f), "--text-column", "sentence",
            "--label-column", "sentiment", "--output", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "4",
            "--num-virtual-tokens", "2", "--max-length", "12", "--strict"]
    assert main(argv) == 1  # a data error at run time (usage errors exit 2)
    err = capsys.readouterr().err
    assert f"{f}, line 3" in err and "missing label" in err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
