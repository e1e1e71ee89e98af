"""Length bucketing of training batches (issue 18, part 3): a few padded lengths so that compiled steps reuse their
graphs, and a bucketed batch gives the loss of the unbucketed one (the added columns are masked padding)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

import softprompt as sp
from softprompt.data import Collator
from softprompt.train.bucketing import BucketCollator, bucket_for, length_buckets

pytestmark = pytest.mark.usefixtures("one_thread")


def test_buckets_are_a_few_multiples_of_eight_that_hold_every_batch():
    lengths = [7 + (i * 37) % 60 for i in range(500)]  # 7..66
    buckets = length_buckets(lengths, batch_size=32, count=4)
    assert buckets == length_buckets(lengths, batch_size=32, count=4)  # seeded
    assert 1 <= len(buckets) <= 4 and list(buckets) == sorted(set(buckets))
    assert all(b % 8 == 0 for b in buckets) and buckets[-1] >= max(lengths)
    # Batches of 32 random rows nearly always hold a long one: the quantiles of the longest row sit near the top.
    assert buckets[0] >= 48
    assert length_buckets(lengths, batch_size=1, count=4)[0] < 48
    # The position limit bounds the buckets, never below the longest example.
    assert length_buckets([10, 66], 2, cap=68)[-1] == 68 and length_buckets([10, 66], 2, cap=20)[-1] == 66
    assert length_buckets([5], 8) == (8,)
    with pytest.raises(ValueError, match="at least one example"):
        length_buckets([], 8)


@pytest.mark.parametrize(("length", "want"), [(1, 16), (16, 16), (17, 32), (32, 32), (40, 40)])
def test_bucket_for_picks_the_smallest_that_holds(length, want):
    assert bucket_for(length, (16, 32)) == want


class _Tok:
    pad_token_id = 0

    def __init__(self, side: str):
        self.padding_side = side


def _feats(rows: list[list[int]], **extra) -> list[dict]:
    return [{"input_ids": r, "attention_mask": [1] * len(r), **{k: v[i] for k, v in extra.items()}}
            for i, r in enumerate(rows)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_added_columns_are_padding_after_the_last_column(side):
    """Also for left-padding (decoder) collators: real tokens keep their positions."""
    feats = _feats([[5, 6, 7], [8, 9]], token_type_ids=[[0, 1, 1], [0, 0]], labels=[[1, 2, 3], [4, 5]])
    plain = Collator(_Tok(side), "token_classification")(feats)
    # The collator's own padding: token labels -100 (ignored by the loss), mask 0, on the tokenizer's side.
    pad = (lambda row, n, fill: [fill] * n + row) if side == "left" else (lambda row, n, fill: row + [fill] * n)
    assert plain["labels"].tolist() == [[1, 2, 3], pad([4, 5], 1, -100)]
    assert plain["attention_mask"].tolist() == [[1, 1, 1], pad([1, 1], 1, 0)]
    batch = BucketCollator(Collator(_Tok(side), "token_classification"), (8, 16))(feats)
    assert batch["input_ids"].shape == (2, 8)
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("token_type_ids", 0), ("labels", -100)):
        assert torch.equal(batch[key][:, :3], plain[key]), key
        assert (batch[key][:, 3:] == fill).all(), key
    # Sequence-level labels are not a token axis; a batch already at a bucket is returned as it is.
    cls = BucketCollator(Collator(_Tok(side), "classification"), (8,))(_feats([[5] * 8], labels=[1]))
    assert cls["labels"].shape == (1,) and cls["input_ids"].shape == (1, 8)
    # Decoders on embeddings: in front (their head reads the last column).
    front = BucketCollator(Collator(_Tok(side), "token_classification"), (8,), left=True)(feats)
    assert torch.equal(front["input_ids"][:, 5:], plain["input_ids"]) and not front["attention_mask"][:, :5].any()
    # Longer than every bucket: left as the collator padded it.
    assert BucketCollator(Collator(_Tok(side), "classification"), (2,))(feats[:1])["input_ids"].shape == (1, 3)


def test_multiple_choice_pads_the_token_axis():
    feats = [{"input_ids": [[5, 6], [7, 8, 9]], "attention_mask": [[1, 1], [1, 1, 1]], "labels": 1}]
    batch = BucketCollator(Collator(_Tok("right"), "multiple_choice"), (8,))(feats)
    assert batch["input_ids"].shape == (1, 2, 8) and batch["labels"].tolist() == [1]
    assert batch["attention_mask"][0, 0].tolist() == [1, 1] + [0] * 6


@pytest.mark.parametrize(("kind", "config"), [("bert", sp.PrefixConfig(num_virtual_tokens=3)),
                                              ("bert", sp.LatePromptConfig(num_virtual_tokens=2, layer=1)),
                                              ("llama", sp.APTConfig(num_virtual_tokens=3)),
                                              ("llama", sp.LatePromptConfig(num_virtual_tokens=2, layer=1))])
def test_a_bucketed_batch_gives_the_loss_and_gradients_of_the_unbucketed_one(kind, config):
    """Encoders pad on the right, decoders on the left (their last-token head reads the last non-pad token), the
    buckets add columns on the right; float64, so that only summation order could tell the two batches apart.
    Dropout is off (eval mode, gradients on): in training its masks are drawn per element, so a longer batch draws
    other ones (an equally likely run, not the same one)."""
    torch.manual_seed(0)
    base = tiny(kind, task="cls", **({"pad_token_id": 0} if kind == "bert" else {})).double()
    model = sp.wrap(base, config).double().eval()
    rows = [[int(x) for x in torch.randint(3, 100, (n,))] for n in (9, 4, 6)]
    feats = _feats(rows, labels=[0, 1, 1])
    collator = Collator(_Tok("left" if kind == "llama" else "right"), "classification")
    results = []
    for batch in (collator(feats), BucketCollator(collator, (16, 24))(feats)):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout draws (none in these configs, but the heads may have it)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[1][0].item() == pytest.approx(results[0][0].item(), abs=1e-12)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-12, rtol=1e-10, msg=name)
