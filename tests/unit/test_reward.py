"""The ReSuMe reward against hand-computed values (METHOD.md, "Reward for one sampled summary")."""

import inspect
import math
import re
import zlib
from collections import Counter
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertTokenizer

from resume.rewards import (
    DEFAULT_EDGES,
    DEFAULT_VALUES,
    RetrievalReward,
    RewardBatch,
    StructureConfig,
    bucket_index,
    discretize,
    ret_score,
    structure_reward,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
SQRT = math.sqrt


# ----------------------------------------------------------------------------- fake retriever

VOCAB = ("apple", "banana", "cherry", "durian", "elder", "fig", "grape", "honey")
FILLER = "the"  # one token for the tokenizer, invisible to the embedding
HASH_DIMS = 16  # other words are hashed into these extra dimensions


class FakeRetriever:
    """Bag-of-words embeddings (L2-normalised) with a real WordPiece tokenizer, recording its inputs.

    Each VOCAB word is one axis, so cosines are hand-computable; "nonapple" points along
    minus the apple axis (a negative cosine); an empty text embeds to the zero vector.
    """

    def __init__(self) -> None:
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", FILLER, "nonapple", *VOCAB]
        self.tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
        self.query_calls: list[list[str]] = []
        self.document_calls: list[list[str]] = []

    @staticmethod
    def embed(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), len(VOCAB) + HASH_DIMS)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                if word == FILLER:
                    continue
                if word == "nonapple":
                    out[row, 0] -= 1
                elif word in VOCAB:
                    out[row, VOCAB.index(word)] += 1
                else:
                    out[row, len(VOCAB) + zlib.crc32(word.encode()) % HASH_DIMS] += 1
        return torch.nn.functional.normalize(out, dim=1)

    def encode_queries(self, texts: list[str]) -> torch.Tensor:
        self.query_calls.append(list(texts))
        return self.embed(texts)

    def encode_documents(self, texts: list[str]) -> torch.Tensor:
        self.document_calls.append(list(texts))
        return self.embed(texts)


# Hand-computed world: d1 has q+ = {q1}; with n_negatives=2 its q- is always {q2, q3}.
# Cosines with d1 ("apple banana cherry cherry", norm sqrt(6)): q1 1/sqrt6, q2 1/sqrt6,
# q3 2/sqrt6, so RetScore(d1) = 1 / (1 + 1 + 2) = 1/4.
QUERIES = {"q1": "apple", "q2": "banana", "q3": "cherry"}
QRELS = {"q1": {"d1": 1}, "q2": {"d0": 0}}  # grade 0 is not relevant: d0 has no positive
DOCS = {"d1": "apple banana cherry cherry", "d0": "banana"}


def filler(n: int) -> str:
    return f" {FILLER}" * n


# (completion, tokens, structure, RetScore(summary), Delta, bucket, r_phi)
HAND_CASES = [
    ("I ran out of tokens while thinking", -1, -1.0, math.nan, math.nan, -1, -1.0),
    # q1 2/sqrt5, q2 1/sqrt5, q3 0 -> 2/3; Delta 5/12 in [0.2, 0.5)
    ("plan</think> apple apple banana", 3, 0.3, 2 / 3, 5 / 12, 6, 0.8),
    # q1 2/sqrt5, q3 1/sqrt5 -> 2/3; 73 tokens: in range
    ("plan</think> apple apple cherry" + filler(70), 73, 1.0, 2 / 3, 5 / 12, 6, 0.8),
    # q1 0 -> 0; Delta -1/4 in [-0.5, -0.2); 133 tokens: over
    ("plan</think> cherry cherry banana" + filler(130), 133, 0.9, 0.0, -0.25, 1, -0.8),
    # empty summary: 0 tokens, zero embedding, zero denominator -> RetScore 0
    ("plan</think>  \n", 0, 0.3, 0.0, -0.25, 1, -0.8),
    # the last separator wins: summary "apple" -> RetScore 1, Delta 3/4
    ("a</think>b</think> apple", 1, 0.3, 1.0, 0.75, 7, 1.0),
]


def hand_reward(**overrides) -> RetrievalReward:
    return RetrievalReward(FakeRetriever(), DOCS, QUERIES, QRELS, **({"n_negatives": 2} | overrides))


# A larger world for sampling: dA has 10 positives (pool 20), dB 2 (pool 28), dC none.
POOL_QUERIES = {f"t{i:02d}": f"train query {i}" for i in range(30)}
POOL_QRELS = {
    **{f"t{i:02d}": {"dA": 1} for i in range(10)},
    "t10": {"dB": 1},
    "t11": {"dB": 2, "dA": 0},
}
POOL_DOCS = {"dA": "alpha document", "dB": "beta document", "dC": "nobody asks about this"}
POSITIVES = {"dA": {f"t{i:02d}" for i in range(10)}, "dB": {"t10", "t11"}}
DEV_QUERIES = {f"dev{i}": f"secret held out question {i}" for i in range(5)}


def pool_reward(retriever=None, **overrides) -> RetrievalReward:
    kwargs = {"n_negatives": 5} | overrides
    return RetrievalReward(retriever or FakeRetriever(), POOL_DOCS, POOL_QUERIES, POOL_QRELS, **kwargs)


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("num_tokens", "expected"),
    [(None, -1.0), (0, 0.3), (1, 0.3), (63, 0.3), (64, 1.0), (100, 1.0), (128, 1.0), (129, 0.9), (5000, 0.9)],
)
def test_structure_reward(num_tokens, expected):
    assert structure_reward(num_tokens) == expected
    assert StructureConfig()(num_tokens) == expected


def test_structure_reward_custom_window_and_values():
    kwargs = {"min_tokens": 10, "max_tokens": 20, "in_range": 2.0, "over": 1.5, "under": 0.5, "missing": -3.0}
    assert [structure_reward(n, **kwargs) for n in (None, 9, 10, 20, 21)] == [-3.0, 0.5, 2.0, 2.0, 1.5]


def test_structure_rejects_bad_inputs():
    with pytest.raises(ValueError, match="num_tokens"):
        structure_reward(-1)
    with pytest.raises(ValueError, match="min_tokens <= max_tokens"):
        StructureConfig(min_tokens=200, max_tokens=128)


# ----------------------------------------------------------------------------- RetScore


def test_ret_score_ratio_hand_computed():
    pos = torch.tensor([[0.5, 0.3], [0.2, 0.0]])
    neg = torch.tensor([[0.1, 0.1, 0.0], [0.6, 0.2, 0.0]])
    # 0.8 / (0.8 + 0.2) and 0.2 / (0.2 + 0.8)
    torch.testing.assert_close(ret_score(pos, neg), torch.tensor([0.8, 0.2]))


def test_ret_score_clamps_negative_cosines():
    pos = torch.tensor([[0.6, -0.4]])
    neg = torch.tensor([[0.2, -0.5]])
    # clamped: 0.6 / (0.6 + 0.2); raw: 0.2 / (0.2 - 0.3)
    torch.testing.assert_close(ret_score(pos, neg), torch.tensor([0.75]))
    torch.testing.assert_close(ret_score(pos, neg, clamp=False), torch.tensor([-2.0]))


def test_ret_score_zero_denominator_is_zero():
    pos = torch.tensor([[0.0], [-0.3], [0.0]])
    neg = torch.tensor([[0.0, 0.0], [-0.1, 0.0], [0.4, 0.0]])
    torch.testing.assert_close(ret_score(pos, neg), torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(
        ret_score(torch.tensor([[0.3]]), torch.tensor([[-0.3]]), clamp=False), torch.tensor([0.0])
    )


def test_ret_score_ragged_positives_mask():
    pos = torch.tensor([[0.4, 0.2, 0.9], [0.3, 0.9, 0.9]])  # 0.9 entries are padding
    mask = torch.tensor([[True, True, False], [True, False, False]])
    neg = torch.tensor([[0.2, 0.2], [0.1, 0.2]])
    # row 0: 0.6 / (0.6 + 0.4); row 1: 0.3 / (0.3 + 0.3)
    torch.testing.assert_close(ret_score(pos, neg, pos_mask=mask), torch.tensor([0.6, 0.5]))
    # positives_only: mean over real positives
    torch.testing.assert_close(
        ret_score(pos, neg, pos_mask=mask, mode="positives_only"), torch.tensor([0.3, 0.3])
    )


def test_ret_score_positives_only():
    pos = torch.tensor([[0.4, -0.2], [0.0, 0.0]])
    empty = torch.zeros(2, 0)
    torch.testing.assert_close(ret_score(pos, empty, mode="positives_only"), torch.tensor([0.2, 0.0]))
    torch.testing.assert_close(
        ret_score(pos, empty, mode="positives_only", clamp=False), torch.tensor([0.1, 0.0])
    )
    no_positive = torch.tensor([[False, False], [True, True]])
    torch.testing.assert_close(
        ret_score(pos, empty, pos_mask=no_positive, mode="positives_only"), torch.tensor([0.0, 0.0])
    )


def test_ret_score_without_negatives_is_one():
    # why ratio mode needs negatives: with q- empty every text scores 1
    torch.testing.assert_close(
        ret_score(torch.tensor([[0.1], [0.9]]), torch.zeros(2, 0)), torch.tensor([1.0, 1.0])
    )


def test_ret_score_rejects_bad_shapes_and_modes():
    with pytest.raises(ValueError, match="retscore mode"):
        ret_score(torch.zeros(1, 1), torch.zeros(1, 1), mode="softmax")
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        ret_score(torch.zeros(2, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="pos_mask"):
        ret_score(torch.zeros(2, 2), torch.zeros(2, 1), pos_mask=torch.ones(2, 2))


# ----------------------------------------------------------------------------- discrete mapping

EDGE_CASES = [
    (-1.0, 0, -1.0),
    (-0.7, 0, -1.0),
    (-0.5 - 1e-6, 0, -1.0),
    (-0.5, 1, -0.8),
    (-0.2 - 1e-9, 1, -0.8),
    (-0.2, 2, -0.6),
    (-0.1 - 1e-9, 2, -0.6),
    (-0.1, 3, -0.3),
    (-1e-9, 3, -0.3),
    (0.0, 4, 0.3),
    (0.1 - 1e-9, 4, 0.3),
    (0.1, 5, 0.6),
    (0.2 - 1e-9, 5, 0.6),
    (0.2, 6, 0.8),
    (0.5 - 1e-9, 6, 0.8),
    (0.5, 7, 1.0),
    (0.99, 7, 1.0),
    (1.0, 7, 1.0),
]


def test_discretize_every_edge():
    delta = torch.tensor([d for d, _, _ in EDGE_CASES], dtype=torch.float64)
    assert bucket_index(delta).tolist() == [b for _, b, _ in EDGE_CASES]
    torch.testing.assert_close(
        discretize(delta), torch.tensor([v for _, _, v in EDGE_CASES], dtype=torch.float64)
    )


def test_discretize_float32_edges_land_in_their_own_bucket():
    delta = torch.tensor([-0.5, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5, 1.0])
    assert bucket_index(delta).tolist() == [1, 2, 3, 4, 5, 6, 7, 7]
    torch.testing.assert_close(discretize(delta), torch.tensor([-0.8, -0.6, -0.3, 0.3, 0.6, 0.8, 1.0, 1.0]))


def test_discretize_outside_range_and_nan():
    delta = torch.tensor([-1.5, 2.0, math.nan])
    assert bucket_index(delta).tolist() == [0, 7, -1]
    out = discretize(delta)
    assert out[:2].tolist() == [-1.0, 1.0] and math.isnan(out[2])


def test_discretize_custom_buckets():
    delta = torch.tensor([-0.3, 0.0, 0.7])
    torch.testing.assert_close(
        discretize(delta, edges=[0.0], values=[-1.0, 1.0]), torch.tensor([-1.0, 1.0, 1.0])
    )


def test_default_buckets_are_the_papers():
    assert DEFAULT_EDGES == (-0.5, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5)
    assert DEFAULT_VALUES == (-1.0, -0.8, -0.6, -0.3, 0.3, 0.6, 0.8, 1.0)


def test_discretize_validates_buckets():
    with pytest.raises(ValueError, match="strictly increasing.*sort them"):
        discretize(torch.zeros(1), edges=[0.1, 0.0], values=[0, 1, 2])
    with pytest.raises(ValueError, match="give exactly 3 values"):
        discretize(torch.zeros(1), edges=[0.0, 0.1], values=[0, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        bucket_index(torch.zeros(1), edges=[0.0, 0.0])


# ----------------------------------------------------------------------------- RetrievalReward, hand-computed


def test_hand_computed_batch():
    reward = hand_reward()
    batch = reward.compute([c for c, *_ in HAND_CASES], ["d1"] * len(HAND_CASES))
    tokens, structure, ret_s, delta, bucket, r_phi = (list(col) for col in zip(*(c[1:] for c in HAND_CASES)))
    assert batch.num_tokens.tolist() == tokens
    assert batch.has_separator.tolist() == [t >= 0 for t in tokens]
    assert batch.bucket.tolist() == bucket
    torch.testing.assert_close(batch.structure, torch.tensor(structure))
    torch.testing.assert_close(batch.retrieval, torch.tensor(r_phi))
    torch.testing.assert_close(batch.total, torch.tensor(structure) + torch.tensor(r_phi))
    torch.testing.assert_close(batch.ret_score_summary, torch.tensor(ret_s), equal_nan=True)
    torch.testing.assert_close(batch.delta, torch.tensor(delta), equal_nan=True)
    torch.testing.assert_close(batch.ret_score_doc, torch.full((len(HAND_CASES),), 0.25))
    assert batch.total.tolist()[0] == -2.0
    torch.testing.assert_close(batch.total, torch.tensor([-2.0, 1.1, 1.8, 0.1, -0.5, 1.3]))
    assert batch.negative_qids == [("q2", "q3")] * len(HAND_CASES)
    for t in (batch.total, batch.structure, batch.retrieval, batch.delta, batch.ret_score_summary):
        assert t.dtype == torch.float32 and t.device.type == "cpu"
    assert len(batch) == len(HAND_CASES)


def test_missing_separator_is_never_encoded():
    retriever = FakeRetriever()
    reward = RetrievalReward(retriever, DOCS, QUERIES, QRELS, n_negatives=2)
    reward.compute(["no separator here", "r</think> apple"], ["d1", "d1"])
    assert retriever.document_calls == [[DOCS["d1"]], ["apple"]]  # the doc, then the one valid summary


def test_continuous_ablation_uses_delta():
    batch = hand_reward(discrete=False).compute([c for c, *_ in HAND_CASES], ["d1"] * len(HAND_CASES))
    expected = torch.tensor([-1.0, 5 / 12, 5 / 12, -0.25, -0.25, 0.75])
    torch.testing.assert_close(batch.retrieval, expected)
    torch.testing.assert_close(batch.total, torch.tensor([-1.0, 0.3, 1.0, 0.9, 0.3, 0.3]) + expected)
    assert batch.bucket.tolist() == [-1, 6, 6, 1, 1, 7]  # the histogram is still kept


def test_clamp_similarity_config():
    completion = ["p</think> nonapple banana banana"]  # cosines: q1 -1/sqrt5, q2 2/sqrt5, q3 0
    clamped = hand_reward().compute(completion, ["d1"])
    raw = hand_reward(clamp_similarity=False).compute(completion, ["d1"])
    torch.testing.assert_close(clamped.delta, torch.tensor([-0.25]))  # RetScore 0
    torch.testing.assert_close(clamped.retrieval, torch.tensor([-0.8]))
    torch.testing.assert_close(raw.delta, torch.tensor([-1.25]))  # RetScore -1 / (-1 + 2) = -1
    torch.testing.assert_close(raw.retrieval, torch.tensor([-1.0]))


def test_positives_only_ablation():
    reward = hand_reward(retscore="positives_only", n_negatives=0)
    batch = reward.compute(["p</think> apple apple banana"], ["d1"])
    # RetScore = mean cosine with q+: summary 2/sqrt5, document 1/sqrt6
    torch.testing.assert_close(batch.ret_score_doc, torch.tensor([1 / SQRT(6)]))
    torch.testing.assert_close(batch.delta, torch.tensor([2 / SQRT(5) - 1 / SQRT(6)]))
    torch.testing.assert_close(batch.retrieval, torch.tensor([0.8]))
    assert batch.negative_qids == [()]


def test_ragged_positives_in_one_batch():
    queries = {"q1": "apple", "q2": "banana", "q3": "cherry", "q4": "durian"}
    qrels = {"q1": {"d2": 1}, "q2": {"d2": 2}, "q3": {"d3": 1}}
    docs = {"d2": "apple cherry", "d3": "cherry durian"}
    reward = RetrievalReward(FakeRetriever(), docs, queries, qrels, n_negatives=2)
    batch = reward.compute(["r</think> apple banana durian", "r</think> cherry"], ["d2", "d3"])
    # d2: q+ {q1, q2}, q- {q3, q4}; RetScore(d2) = (1/sqrt2) / (2/sqrt2) = 1/2;
    # summary: q1, q2, q4 at 1/sqrt3 -> 2/3, Delta 1/6 -> 0.6
    assert batch.negative_qids[0] == ("q3", "q4")
    torch.testing.assert_close(batch.ret_score_doc[0], torch.tensor(0.5))
    torch.testing.assert_close(batch.delta[0], torch.tensor(1 / 6))
    torch.testing.assert_close(batch.retrieval[0], torch.tensor(0.6))
    # d3: q+ {q3} (padded to width 2); q- 2 of {q1, q2, q4}; only q4 touches "cherry durian"
    negatives = batch.negative_qids[1]
    assert len(negatives) == 2 and set(negatives) <= {"q1", "q2", "q4"}
    doc_score = 1.0 / (1.0 + ("q4" in negatives))
    torch.testing.assert_close(batch.ret_score_doc[1], torch.tensor(doc_score))
    torch.testing.assert_close(batch.ret_score_summary[1], torch.tensor(1.0))


def test_log_dict_stats():
    batch = hand_reward().compute([c for c, *_ in HAND_CASES], ["d1"] * len(HAND_CASES))
    stats = batch.log_dict("summarizer/train")
    assert all(key.startswith("summarizer/train/") for key in stats)
    assert stats["summarizer/train/reward_mean"] == pytest.approx((-2.0 + 1.1 + 1.8 + 0.1 - 0.5 + 1.3) / 6)
    assert stats["summarizer/train/separator_rate"] == pytest.approx(5 / 6)
    assert stats["summarizer/train/length_mean"] == pytest.approx((3 + 73 + 133 + 0 + 1) / 5)
    assert stats["summarizer/train/delta_mean"] == pytest.approx((5 / 12 * 2 - 0.25 * 2 + 0.75) / 5, abs=1e-6)
    assert stats["summarizer/train/bucket_1"] == pytest.approx(2 / 6)
    assert stats["summarizer/train/bucket_6"] == pytest.approx(2 / 6)
    buckets = sum(stats[f"summarizer/train/bucket_{i}"] for i in range(8))
    assert buckets + (1 - stats["summarizer/train/separator_rate"]) == pytest.approx(1.0)
    for key in ("reward_std", "structure_mean", "retrieval_mean", "repetition_mean", "query_overlap_mean"):
        assert math.isfinite(stats[f"summarizer/train/{key}"])


def test_diagnostics_are_reported():
    batch = hand_reward().compute(["x</think> apple apple apple apple", "no separator"], ["d1", "d1"])
    assert batch.repetition[0].item() == pytest.approx(1 / 2)  # 2 trigrams, the second repeats
    assert batch.query_overlap[0].item() == 1.0  # q+ = "apple"
    assert math.isnan(batch.repetition[1]) and math.isnan(batch.query_overlap[1])


def test_empty_call():
    batch = hand_reward().compute([], [])
    assert len(batch) == 0
    assert math.isnan(batch.log_dict("x")["x/reward_mean"])


def test_trl_call_convention():
    reward = hand_reward()
    logged: dict[str, float] = {}
    totals = reward(
        completions=["plan</think> apple apple banana", [{"role": "assistant", "content": "no separator"}]],
        doc_ids=["d1", "d1"],
        prompts=["p", "p"],
        trainer_state=None,
        log_metric=logged.__setitem__,
    )
    assert isinstance(totals, list) and all(isinstance(t, float) for t in totals)
    assert totals == pytest.approx([1.1, -2.0])
    assert reward.last_batch is not None and len(reward.last_batch) == 2
    assert logged["reward/separator_rate"] == pytest.approx(0.5)
    assert all(math.isfinite(v) for v in logged.values())


# ----------------------------------------------------------------------------- negatives


def test_group_members_share_negatives():
    reward = pool_reward(discrete=False)  # continuous: any change of q- shows in the reward
    doc_ids = ["dA", "dB", "dA", "dA", "dB", "dA"]
    completions = ["r</think> train query 3 and 12"] * len(doc_ids)
    deltas = set()
    for _ in range(4):
        batch = reward.compute(completions, doc_ids)
        by_doc = {d: {n for n, dd in zip(batch.negative_qids, doc_ids) if dd == d} for d in set(doc_ids)}
        assert all(len(v) == 1 for v in by_doc.values())
        # identical completions of one document get identical rewards
        a_totals = {t for t, d in zip(batch.total.tolist(), doc_ids) if d == "dA"}
        assert len(a_totals) == 1
        deltas.add(batch.delta[0].item())
    assert len(deltas) > 1  # the negatives do move the reward between calls


def test_negatives_change_between_calls():
    reward = pool_reward()
    draws = {reward.compute(["r</think> x"], ["dA"]).negative_qids[0] for _ in range(4)}
    assert len(draws) > 1


@pytest.mark.parametrize("seed", range(100))
def test_negatives_are_never_relevant(seed):
    reward = pool_reward(seed=seed, n_negatives=8)
    for doc_id in ("dA", "dB"):
        negatives = reward.sample_negatives(doc_id)
        assert len(negatives) == 8 == len(set(negatives))
        assert not set(negatives) & POSITIVES[doc_id]
        assert set(negatives) <= set(POOL_QUERIES)


def test_negatives_exhaust_a_small_pool():
    qrels = {f"t{i:02d}": {"dA": 1} for i in range(25)}  # 5 non-relevant queries left
    for seed in range(20):
        reward = RetrievalReward(FakeRetriever(), POOL_DOCS, POOL_QUERIES, qrels, n_negatives=5, seed=seed)
        assert reward.sample_negatives("dA") == tuple(f"t{i:02d}" for i in range(25, 30))


def test_negatives_are_uniform():
    reward = pool_reward()
    counts = Counter(q for _ in range(2000) for q in reward.sample_negatives("dB"))
    assert set(counts) == set(POOL_QUERIES) - POSITIVES["dB"]
    expected = 2000 * 5 / 28  # about 357
    assert all(0.75 * expected < c < 1.25 * expected for c in counts.values()), counts


def test_determinism_under_seed():
    doc_ids = ["dA", "dA", "dB", "dB"]
    completions = ["r</think> alpha train query", "r</think> query 3", "r</think> beta", "r</think> query 10"]
    runs = []
    for seed in (7, 7, 8):
        reward = pool_reward(seed=seed)
        runs.append([reward.compute(completions, doc_ids) for _ in range(3)])
    for a, b in zip(runs[0], runs[1]):
        assert a.negative_qids == b.negative_qids
        torch.testing.assert_close(a.total, b.total)
    assert [b.negative_qids for b in runs[0]] != [b.negative_qids for b in runs[2]]


def test_only_given_training_queries_are_encoded():
    retriever = FakeRetriever()
    reward = pool_reward(retriever)
    for _ in range(8):
        reward.compute(["r</think> secret held out question", "r</think> train"], ["dA", "dB"])
    encoded = {text for call in retriever.query_calls for text in call}
    assert encoded <= set(POOL_QUERIES.values())
    assert not encoded & set(DEV_QUERIES.values())


def test_query_embeddings_are_memoised():
    retriever = FakeRetriever()
    reward = pool_reward(retriever, n_negatives=20)  # dA: its whole pool, so nothing new after call 1
    reward.compute(["r</think> a"], ["dA"])
    assert len(retriever.query_calls) == 1 and len(retriever.query_calls[0]) == 30
    reward.compute(["r</think> a", "r</think> b"], ["dA", "dA"])
    assert len(retriever.query_calls) == 1  # all cached
    assert retriever.document_calls[-1] == ["a", "b"]  # summaries in one call, the doc cached
    reward.clear_cache()
    reward.compute(["r</think> a"], ["dA"])
    assert len(retriever.query_calls) == 2 and len(retriever.query_calls[1]) == 30
    assert retriever.document_calls[-2] == [POOL_DOCS["dA"]]


def test_rewardable_doc_ids():
    assert pool_reward().rewardable_doc_ids() == ["dA", "dB"]
    assert hand_reward().rewardable_doc_ids() == ["d1"]


# ----------------------------------------------------------------------------- validation


def test_rejects_qrels_naming_unknown_queries():
    qrels = {**POOL_QRELS, "dev3": {"dA": 1}}
    with pytest.raises(ValueError, match="'dev3'.*training split"):
        RetrievalReward(FakeRetriever(), POOL_DOCS, POOL_QUERIES, qrels)


def test_rejects_doc_without_positives_and_unknown_doc():
    reward = pool_reward()
    with pytest.raises(ValueError, match="'dC'.*rewardable_doc_ids"):
        reward.compute(["r</think> s"], ["dC"])
    with pytest.raises(KeyError, match="'dZ'"):
        reward.compute(["r</think> s"], ["dZ"])


def test_ratio_without_negatives_is_rejected():
    with pytest.raises(ValueError, match="identically 1.*retscore=positives_only"):
        pool_reward(n_negatives=0)


def test_positives_only_with_negatives_is_rejected():
    with pytest.raises(ValueError, match="set reward.n_negatives=0"):
        pool_reward(retscore="positives_only", n_negatives=4)


def test_negative_pool_too_small():
    with pytest.raises(ValueError, match=r"'dA'.*30 training queries minus 10.*n_negatives<=20"):
        pool_reward(n_negatives=21)
    pool_reward(n_negatives=20)


def test_other_validation_errors():
    with pytest.raises(ValueError, match="not one of"):
        pool_reward(retscore="softmax")
    with pytest.raises(ValueError, match="must be >= 0"):
        pool_reward(n_negatives=-1)
    with pytest.raises(ValueError, match="give exactly 8 values"):
        pool_reward(bucket_values=[0.0, 1.0])
    with pytest.raises(ValueError, match="unknown reward.structure keys"):
        pool_reward(structure={"min_token": 64})
    with pytest.raises(ValueError, match="one doc id each"):
        pool_reward().compute(["a", "b"], ["dA"])
    with pytest.raises(ValueError, match="nothing can be rewarded"):
        RetrievalReward(FakeRetriever(), {"dX": "x"}, POOL_QUERIES, POOL_QRELS)

    class NoTokenizer:
        def encode_queries(self, texts):
            return FakeRetriever.embed(texts)

        encode_documents = encode_queries

    with pytest.raises(TypeError, match="tokenizer"):
        RetrievalReward(NoTokenizer(), POOL_DOCS, POOL_QUERIES, POOL_QRELS)


# ----------------------------------------------------------------------------- the config


def load_reward_node(**overrides):
    node = OmegaConf.merge(OmegaConf.load(CONF / "reward" / "resume.yaml"), overrides)
    return OmegaConf.create({"seed": 3, "reward": node}).reward


def test_yaml_keys_are_constructor_keywords():
    node = load_reward_node()
    params = inspect.signature(RetrievalReward.__init__).parameters
    keys = {k for k in node if not k.startswith("_")}
    keyword_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keys == keyword_only
    assert {"discrete", "retscore", "n_negatives", "clamp_similarity"} <= keys


def test_yaml_builds_the_papers_reward():
    factory = hydra.utils.instantiate(load_reward_node())
    reward = factory(retriever=FakeRetriever(), doc_texts=POOL_DOCS, queries=POOL_QUERIES, qrels=POOL_QRELS)
    assert isinstance(reward, RetrievalReward)
    assert reward.seed == 3 and reward.n_negatives == 8 and reward.retscore == "ratio"
    assert reward.discrete and reward.clamp_similarity and reward.separator == "</think>"
    assert reward.structure == StructureConfig()
    assert reward.bucket_edges == DEFAULT_EDGES and reward.bucket_values == DEFAULT_VALUES
    assert isinstance(reward.compute(["r</think> alpha"], ["dA"]), RewardBatch)


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        ({"discrete": False}, lambda r: not r.discrete),
        ({"retscore": "positives_only", "n_negatives": 0}, lambda r: r.retscore == "positives_only"),
    ],
)
def test_yaml_ablation_overrides(overrides, check):
    factory = hydra.utils.instantiate(load_reward_node(**overrides))
    reward = factory(retriever=FakeRetriever(), doc_texts=POOL_DOCS, queries=POOL_QUERIES, qrels=POOL_QRELS)
    assert check(reward)
    reward.compute(["r</think> alpha"], ["dA"])
