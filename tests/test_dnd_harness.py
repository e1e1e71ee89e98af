"""DnD part A: templates, evaluation harness (log-likelihood + generation) and the checkpoint zoo, on tiny models."""
import json

import pytest
import torch
from conftest import tiny

from softprompt.dnd import templates as T
from softprompt.dnd.harness import (
    evaluate,
    evaluate_items,
    option_logliks,
    parse_answer,
)
from softprompt.dnd.zoo import ALL_TARGETS, build_zoo

WORDS = ["A", "B", "C", "D", "E", "yes", "no", "which", "is", "the", "sky", "blue", "red", "green", "answer",
         "question", "letter", "of", "correct", "option", "with", "read", "passage", "and", "or", ",", ".",
         "?", ":", "(", ")", "text", "goal", "sentence", "choose"]


def _tok(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>", "<user>", "<assistant>"]
    vocab = {w: i for i, w in enumerate(specials + list(dict.fromkeys(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    if chat:
        tok.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                             "{% if add_generation_prompt %}<assistant> {% endif %}")
    return tok


RECS = [{"text": "which is the sky", "choices": ["blue", "red", "green"], "label": 0},
        {"text": "which is red", "choices": ["green", "red"], "label": 1},
        {"text": "the answer", "choices": ["A", "B", "C", "D"], "label": 3}]


def test_templates_gold():
    tok = _tok()
    for r in RECS:
        it = T.format_example("commonsense/arc_easy", r, tok)
        assert it.chat and it.prompt.startswith("<user>") and it.prompt.rstrip().endswith("<assistant>")
        assert it.options == tuple("ABCD"[:len(r["choices"])]) and it.options[it.gold] == "ABCD"[r["label"]]
        for L, c in zip(it.options, r["choices"]):
            assert f"{L}. {c}" in it.prompt
    b = T.format_example("boolq", {"text": "the sky is blue", "text_pair": "is the sky blue", "label": 1}, None)
    assert not b.chat and b.options == (" no", " yes") and b.options[b.gold] == " yes" and b.kind == "yesno"
    assert "is the sky blue?" in b.prompt and b.prompt.endswith("Answer:")


def test_loglik_matches_hand_computation():
    tok, model = _tok(), tiny("llama").eval()
    items = T.format_dataset("commonsense/arc_easy", RECS, tok)
    # multi-token answers exercise the (prompt + answer) path; single-token letters the prompt-only path
    items.append(T.Prompted(items[0].prompt, ("A B", "C", "yes no D"), 2, True, "letter"))
    got = option_logliks(model, tok, items, batch_size=3, progress=False)
    with torch.no_grad():
        for it, row in zip(items, got):
            p = tok(it.prompt, add_special_tokens=False)["input_ids"]
            for opt, s in zip(it.options, row):
                a = tok(opt, add_special_tokens=False)["input_ids"]
                lp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].float(), -1)
                hand = sum(float(lp[len(p) - 1 + k, t]) for k, t in enumerate(a))
                assert s == pytest.approx(hand, abs=1e-4)
    res = evaluate_items(model, tok, items[:3], batch_size=2, measures=("loglik",), progress=False)
    hand_acc = sum(max(range(len(r)), key=r.__getitem__) == it.gold for r, it in zip(got[:3], items[:3])) / 3
    assert res["loglik_acc"] == pytest.approx(hand_acc) and res["n"] == 3


def test_generation_parsing():
    mc = T.Prompted("p", tuple("ABCD"), 1, True, "letter")
    assert parse_answer("B", mc) == 1 and parse_answer(" (C) because", mc) == 2 and parse_answer("[D]", mc) == 3
    assert parse_answer("Answer: A.", mc) == 0 and parse_answer("none here", mc) == -1
    assert parse_answer("E", mc) == -1
    yn = T.Prompted("p", ("no", "yes"), 1, True, "yesno")
    assert parse_answer("Yes, it is", yn) == 1 and parse_answer(" no.", yn) == 0 and parse_answer("True", yn) == 1
    assert parse_answer("maybe", yn) == -1
    tok, model = _tok(), tiny("llama").eval()
    res = evaluate_items(model, tok, T.format_dataset("commonsense/arc_easy", RECS, tok), batch_size=2,
                         measures=("gen",), max_new_tokens=3, progress=False, return_details=True)
    for text, pred, it in zip(res["gen_text"], res["gen_pred"], T.format_dataset("commonsense/arc_easy", RECS, tok)):
        assert pred == parse_answer(text, it)
    assert 0.0 <= res["gen_acc"] <= 1.0


def test_zoo_two_datasets(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    tok, model = _tok(), tiny("llama")
    ds = ["commonsense/arc_easy", "superglue/boolq"]
    m = build_zoo("tiny", ds, rank=2, targets="all", warmup_steps=2, checkpoints=3, out=tmp_path / "zoo",
                  lr=1e-2, batch_size=4, max_length=64, train_limit=8, dev_limit=3, eval_batch_size=4,
                  device="cpu", model=model, tokenizer=tok, progress=False, format="letter", schedule="constant")
    disk = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    assert disk == json.loads(json.dumps(m))
    assert list(m["datasets"]) == ds and len(m["checkpoints"]) == 6
    assert sorted(m["target_modules"]) == sorted(ALL_TARGETS) and m["rank"] == 2 and m["lora_alpha"] == 4
    assert m["datasets"]["superglue/boolq"]["splits"]["zoo"].startswith("val")
    init = load_file(str(tmp_path / "zoo" / "init" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in init) and all(float(v.abs().sum()) == 0 for k, v in init.items() if "lora_B" in k)
    for d in ds:
        cks = [c for c in m["checkpoints"] if c["dataset"] == d]
        assert [c["step"] for c in cks] == [3, 4, 5]
        for c in cks:
            assert 0 <= c["loglik_acc"] <= 1 and 0 <= c["gen_acc"] <= 1 and c["n"] == 3
            assert (tmp_path / "zoo" / c["path"] / "adapter_config.json").exists()
        w = load_file(str(tmp_path / "zoo" / cks[0]["path"] / "adapter_model.safetensors"))
        assert set(w) == set(init) and any(not torch.equal(w[k], init[k]) for k in w)
    # the two datasets trained differently from the same start
    a = load_file(str(tmp_path / "zoo" / m["checkpoints"][-1]["path"] / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "zoo" / m["checkpoints"][0]["path"] / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    base = tiny("llama")
    pm = PeftModel.from_pretrained(base, str(tmp_path / "zoo" / m["checkpoints"][-1]["path"])).eval()
    r = evaluate(pm, tok, "commonsense/arc_easy", "dnd:test", limit=3, batch_size=3, progress=False)
    assert r["n"] == 3 and set(r) >= {"loglik_acc", "gen_acc"}


def test_adapter_slot_scores_like_a_fresh_load(tmp_path):
    """``AdapterSlot`` swaps LoRA weights into one loaded model: every adapter's logits equal a fresh
    ``load_model``'s to the bit, also after other adapters were in the slot; another LoRA layout gets a fresh
    model, and an adapter that does not cover the slot's LoRA weights is refused."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from softprompt.dnd.harness import AdapterSlot, load_model

    base = tmp_path / "base"
    tiny("llama").save_pretrained(base)
    _tok(chat=False).save_pretrained(base)
    folders = {}
    for name, rank, seed in (("a", 2, 1), ("b", 2, 2), ("wide", 4, 3)):
        model = load_model(str(base), device="cpu")[0]
        torch.manual_seed(seed)  # after loading: load_base seeds the global generator for a task head
        pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=4, target_modules="all-linear",
                                              init_lora_weights=False))
        pm.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    fresh = {n: logits(load_model(str(base), f, "cpu")[0]) for n, f in folders.items()}
    assert not torch.equal(fresh["a"], fresh["b"])
    slot = AdapterSlot(str(base), "cpu")
    previous = slot.load(folders["a"])[0]
    # (adapter, whether the slot keeps its model): same layout -> swap; the rank-4 layout and back -> fresh model
    for name, kept in (("a", True), ("b", True), ("a", True), ("wide", False), ("b", False)):
        model = slot.load(folders[name])[0]
        assert torch.equal(logits(model), fresh[name]) and (model is previous) == kept, name
        previous = model
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text((tmp_path / "b" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    save_file(dict(list(tensors.items())[1:]), str(partial / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not match the loaded LoRA layout"):
        slot.load(str(partial))
