"""UniqueDocBatchSampler (no false negatives in a batch), training_pairs and the collator."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from resume.data import Split
from resume.retriever.adapt import Pair, PairCollator, UniqueDocBatchSampler, training_pairs

# heavy duplication: one document with 10 queries, one with 5, 40 with one
DOC_IDS = ["hot"] * 10 + [f"d{i}" for i in range(40)] + ["warm"] * 5


def _check_epoch(batches: list[list[int]], doc_ids: list[str], batch_size: int) -> None:
    for b in batches:
        docs = [doc_ids[i] for i in b]
        assert len(set(docs)) == len(docs), f"duplicate document in batch {docs}"
        assert 1 <= len(b) <= batch_size
    assert sorted(i for b in batches for i in b) == list(range(len(doc_ids))), "every pair exactly once"


@pytest.mark.parametrize("batch_size", [2, 4, 8, 16])
def test_no_duplicate_doc_and_every_pair_once(batch_size):
    for seed in range(25):
        sampler = UniqueDocBatchSampler(DOC_IDS, batch_size, seed=seed)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            _check_epoch(batches, DOC_IDS, batch_size)
            assert len(sampler) == len(batches)
            # the 10 pairs of "hot" need 10 batches at least
            assert len(batches) >= max(10, -(-len(DOC_IDS) // batch_size))


def test_only_the_last_batches_are_short():
    sampler = UniqueDocBatchSampler(DOC_IDS, 8, seed=3)
    sizes = [len(b) for b in sampler]
    first_short = next(i for i, n in enumerate(sizes + [0]) if n < 8)
    assert all(n < 8 for n in sizes[first_short:])
    assert sum(sizes) == len(DOC_IDS)


def test_all_pairs_of_one_document():
    batches = list(UniqueDocBatchSampler(["x"] * 10, 4, seed=0))
    assert len(batches) == 10 and all(len(b) == 1 for b in batches)
    _check_epoch(batches, ["x"] * 10, 4)


def test_deterministic_given_seed_and_epoch():
    a, b, c = (UniqueDocBatchSampler(DOC_IDS, 8, seed=s) for s in (7, 7, 8))
    assert list(a) == list(b)
    assert list(a) != list(c)
    epochs = []
    for e in range(3):
        a.set_epoch(e)
        epochs.append(list(a))
    assert epochs[0] != epochs[1] != epochs[2]
    a.set_epoch(1)
    assert list(a) == epochs[1]  # an epoch is reproducible
    assert list(a) == list(a)  # iterating twice does not advance the epoch


def test_relevant_sets_keep_false_negatives_out():
    # query A is relevant to docs a1, a2 (two pairs); query B to b and a2 (two pairs)
    doc_ids = ["a1", "a2", "b", "a2", "c", "d", "e", "f"]
    relevant = [{"a1", "a2"}, {"a1", "a2"}, {"b", "a2"}, {"b", "a2"}, {"c"}, {"d"}, {"e"}, {"f"}]
    for seed in range(30):
        for batch in UniqueDocBatchSampler(doc_ids, 4, seed=seed, relevant=relevant):
            docs = {doc_ids[i] for i in batch}
            for i in batch:
                others = docs - {doc_ids[i]}
                assert not (others & relevant[i]), (
                    f"a doc relevant to pair {i}'s query is its negative: {batch}"
                )


def test_drop_last_keeps_only_full_batches():
    batches = list(UniqueDocBatchSampler(DOC_IDS, 8, seed=0, drop_last=True))
    assert batches and all(len(b) == 8 for b in batches)


def test_replicas_split_global_batches_with_no_document_twice_across_devices():
    """Rank r takes slice r of each global batch of batch_size * replicas pairs: equal step counts,
    every pair once, and no document twice among the batches the devices train on together (the
    negatives gathered across devices hold no false negative)."""
    ranks = [UniqueDocBatchSampler(DOC_IDS, 4, seed=1, num_replicas=3, rank=r) for r in range(3)]
    global_plan = UniqueDocBatchSampler(DOC_IDS, 12, seed=1).plan()
    assert ranks[0].plan() == global_plan
    lens = {len(s) for s in ranks}
    assert lens == {len([b for b in global_plan if len(b) >= 3])}
    steps = list(zip(*(list(s) for s in ranks)))
    for step, plan_batch in zip(steps, global_plan):
        together = [i for b in step for i in b]
        assert together == plan_batch  # the global batch, split in rank order
        assert len({DOC_IDS[i] for i in together}) == len(together)
        assert max(map(len, step)) - min(map(len, step)) <= 1 and min(map(len, step)) >= 1
    seen = Counter(i for s in ranks for b in s for i in b)
    dropped = [b for b in global_plan if len(b) < 3]
    assert max(seen.values()) == 1 and len(seen) == len(DOC_IDS) - sum(map(len, dropped))


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        UniqueDocBatchSampler(DOC_IDS, 0)
    with pytest.raises(ValueError, match="one per pair"):
        UniqueDocBatchSampler(DOC_IDS, 4, relevant=[{"x"}])
    with pytest.raises(ValueError, match="rank"):
        UniqueDocBatchSampler(DOC_IDS, 4, num_replicas=2, rank=2)


def test_training_pairs_keeps_judged_relevant_only():
    split = Split(
        "train",
        queries={"q1": "first query", "q2": "second query"},
        qrels={"q1": {"d1": 1, "d2": 2, "d3": 0}, "q2": {"d1": 1}},
    )
    texts = {"d1": "summary one", "d2": "summary two", "d3": "summary three"}
    pairs = training_pairs(split, texts)
    assert [(p.query_id, p.doc_id, p.doc) for p in pairs] == [
        ("q1", "d1", "summary one"),
        ("q1", "d2", "summary two"),
        ("q2", "d1", "summary one"),
    ]
    assert pairs[0].relevant == frozenset({"d1", "d2"}) and pairs[0].query == "first query"
    with pytest.raises(ValueError, match="summarize every judged document"):
        training_pairs(split, {"d1": "only one"})


def _fake_tokenize(texts: list[str], kind: str) -> dict[str, torch.Tensor]:
    n = 3 if kind == "query" else 5
    return {
        "input_ids": torch.zeros(len(texts), n, dtype=torch.long),
        "attention_mask": torch.ones(len(texts), n),
        "token_type_ids": torch.zeros(len(texts), n, dtype=torch.long),
    }


def test_collator_appends_non_relevant_negatives():
    pool = {f"n{i}": f"negative {i}" for i in range(20)} | {
        "d1": "pos 1",
        "d2": "pos 2",
        "d9": "also relevant",
    }
    batch = [
        Pair("q one", "pos 1", "d1", "q1", frozenset({"d1", "d9"})),
        Pair("q two", "pos 2", "d2", "q2", frozenset({"d2"})),
    ]
    collate = PairCollator(_fake_tokenize, negatives=4, negative_pool=pool, seed=0)
    out = collate(batch)
    assert set(out) == {"query", "doc"} and set(out["doc"]) == {"input_ids", "attention_mask"}
    assert out["query"]["input_ids"].shape == (2, 3) and out["doc"]["input_ids"].shape == (2 + 4, 5)
    for _ in range(50):
        negs = collate.sample_negatives(batch)
        assert len(set(negs)) == 4 and not set(negs) & {"d1", "d2", "d9"}
    assert PairCollator(_fake_tokenize)(batch)["doc"]["input_ids"].shape == (2, 5)  # no negatives by default
    with pytest.raises(ValueError, match="hard_negatives"):
        PairCollator(_fake_tokenize, negatives=30, negative_pool=pool)
