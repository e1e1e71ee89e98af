"""Every task loads from the real offline data with the documented counts, schemas and labels; derived splits."""

from __future__ import annotations

import collections
import hashlib
import json
import warnings

import pytest
from _helpers.tasks import DATA, _label_counts, needs_data

from softprompt import tasks as T

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
