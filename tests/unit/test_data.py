import json
from pathlib import Path

import pytest

from resume.data import DataError, load_beir, load_dataset
from resume.data.load import carve_dev, subset
from resume.data.toy import write_toy


def _write(folder: Path, corpus: list, queries: list, qrels: dict[str, str]) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join((c if isinstance(c, str) else json.dumps(c)) + "\n" for c in corpus))
    (folder / "queries.jsonl").write_text("".join((q if isinstance(q, str) else json.dumps(q)) + "\n" for q in queries))
    for split, text in qrels.items():
        (folder / "qrels" / f"{split}.tsv").write_text(text)
    return folder


DOCS = [{"_id": "d1", "title": "T1", "text": "one"}, {"_id": "d2", "title": "", "text": "two"}]
QUERIES = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}]
HEADER = "query-id\tcorpus-id\tscore\n"


def test_loads_valid_folder(tmp_path):
    f = _write(tmp_path, DOCS, QUERIES, {"test": HEADER + "q1\td1\t1\nq2\td2\t2\n"})
    data = load_beir(f, ["test"])
    assert data.corpus["d1"].full_text == "T1 one"
    assert data.corpus["d2"].full_text == "two"
    assert data.split("test").qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert data.split("test").queries == {"q1": "first", "q2": "second"}


def test_headerless_qrels_keep_first_row(tmp_path):
    f = _write(tmp_path, DOCS, QUERIES, {"test": "q1\td1\t1\nq2\td2\t1\n"})
    assert set(load_beir(f, ["test"]).split("test").qrels) == {"q1", "q2"}


@pytest.mark.parametrize(
    "corpus, queries, qrels, match",
    [
        (['{"_id": "d1", "text": "x"}', '{"_id": "d2", "text": '], QUERIES, HEADER, r"corpus.jsonl:2: invalid JSON"),
        ([{"_id": "d1", "text": "x"}, {"_id": "d2", "title": " ", "text": " "}], QUERIES, HEADER,
         r"corpus.jsonl:2: document 'd2' has an empty text"),
        ([{"text": "x"}], QUERIES, HEADER, r"corpus.jsonl:1: missing '_id'"),
        ([{"_id": "d1", "text": "x"}, {"_id": "d1", "text": "y"}], QUERIES, HEADER, r"corpus.jsonl:2: duplicate document"),
        (DOCS, [{"_id": "q1", "text": ""}], HEADER, r"queries.jsonl:1: query 'q1' has an empty text"),
        (DOCS, QUERIES, HEADER + "q1\td1\t1\nq2\td9\t1\n", r"test.tsv:3: qrels name document 'd9'"),
        (DOCS, QUERIES, HEADER + "q7\td1\t1\n", r"test.tsv:2: qrels name query 'q7'"),
        (DOCS, QUERIES, HEADER + "q1\td1\tyes\n", r"test.tsv:2: relevance grade 'yes' is not an integer"),
        (DOCS, QUERIES, HEADER + "q1 d1 1\n", r"test.tsv:2: expected 3 tab-separated columns"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, corpus, queries, qrels, match):
    f = _write(tmp_path, corpus, queries, {"test": qrels})
    with pytest.raises(DataError, match=match):
        load_beir(f, ["test"])


def test_missing_split_lists_available(tmp_path):
    f = _write(tmp_path, DOCS, QUERIES, {"test": HEADER + "q1\td1\t1\n"})
    with pytest.raises(DataError, match=r"split\(s\) \['train'\] not found \(available: \['test'\]\)"):
        load_beir(f, ["train", "test"])


def test_missing_eval_split_fails_early(tmp_path):
    f = _write(tmp_path, DOCS, QUERIES, {"test": HEADER + "q1\td1\t1\n"})
    with pytest.raises(DataError, match="split 'dev' is not available"):
        load_dataset("x", str(f), ["test"], eval_split="dev")


def test_missing_folder_without_url(tmp_path):
    with pytest.raises(DataError, match="is not a folder and no data.url"):
        load_dataset("x", str(tmp_path / "nope"), ["test"], eval_split="test")


def test_carve_dev_is_seeded_and_disjoint(tmp_path):
    f = write_toy(tmp_path / "toy", seed=0)
    a, b = load_beir(f, ["train", "test"]), load_beir(f, ["train", "test"])
    n_train = len(a.split("train").qrels)
    carve_dev(a, "train", 0.25, seed=3)
    carve_dev(b, "train", 0.25, seed=3)
    assert a.split("dev").qrels == b.split("dev").qrels
    assert not set(a.split("dev").qrels) & set(a.split("train").qrels)
    assert len(a.split("dev").qrels) + len(a.split("train").qrels) == n_train
    c = load_beir(f, ["train", "test"])
    carve_dev(c, "train", 0.25, seed=4)
    assert c.split("dev").qrels != a.split("dev").qrels


def test_subset_keeps_relevant_docs_and_rejects_too_small_budget(tmp_path):
    f = write_toy(tmp_path / "toy", n_topics=4, docs_per_topic=8, seed=0)
    data = load_beir(f, ["train", "test"])
    subset(data, max_docs=20, max_queries={"test": 4, "train": 6}, seed=0)
    assert len(data.corpus) == 20 and len(data.split("test").qrels) == 4
    for sp in data.splits.values():
        for docs in sp.qrels.values():
            assert all(d in data.corpus for d in docs)
    assert any("corpus: 20 of 32" in n for n in data.notes)
    data = load_beir(f, ["train", "test"])
    with pytest.raises(DataError, match="data.max_docs=5 is smaller than the 32 documents"):
        subset(data, max_docs=5, max_queries=None, seed=0)


def test_toy_generation_is_deterministic(tmp_path):
    a, b = write_toy(tmp_path / "a", seed=1), write_toy(tmp_path / "b", seed=1)
    for rel in ["corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"]:
        assert (a / rel).read_text() == (b / rel).read_text()
