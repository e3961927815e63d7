import json
import logging
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from resume.data import DataError, load_beir, load_dataset, register_data_resolvers
from resume.data.load import carve_dev, subset
from resume.data.toy import write_toy
from resume.utils.config import CONFIG_DIR


def _write(folder: Path, corpus: list, queries: list, qrels: dict[str, str]) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text(
        "".join((c if isinstance(c, str) else json.dumps(c)) + "\n" for c in corpus)
    )
    (folder / "queries.jsonl").write_text(
        "".join((q if isinstance(q, str) else json.dumps(q)) + "\n" for q in queries)
    )
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
        (
            ['{"_id": "d1", "text": "x"}', '{"_id": "d2", "text": '],
            QUERIES,
            HEADER,
            r"corpus.jsonl:2: invalid JSON",
        ),
        (
            [{"_id": "d1", "text": "x"}, {"_id": "d2", "title": " ", "text": " "}],
            QUERIES,
            HEADER,
            r"corpus.jsonl:2: document 'd2' has an empty text",
        ),
        ([{"text": "x"}], QUERIES, HEADER, r"corpus.jsonl:1: missing '_id'"),
        (
            [{"_id": "d1", "text": "x"}, {"_id": "d1", "text": "y"}],
            QUERIES,
            HEADER,
            r"corpus.jsonl:2: duplicate document",
        ),
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


# --- data=beir: any BEIR folder, splits auto-detected, name from the folder ----------------------


def _beir_cfg(path: str | None) -> DictConfig:
    """conf/data/beir.yaml under `data`, with the one key of paths it interpolates."""
    register_data_resolvers()
    data = OmegaConf.load(CONFIG_DIR / "data" / "beir.yaml")
    if path is not None:
        data.path = path
    return OmegaConf.create({"data": data, "paths": {"data_dir": "/unused"}})


def test_splits_none_loads_every_qrels_file_sorted(tmp_path):
    qrels = {"train": HEADER + "q1\td1\t1\n", "test": HEADER + "q2\td2\t1\n", "dev": HEADER + "q1\td2\t1\n"}
    f = _write(tmp_path / "mine", DOCS, QUERIES, qrels)
    (f / "qrels" / "._test.tsv").write_text("not qrels")  # macOS AppleDouble file: not a split
    (f / "qrels" / "notes.txt").write_text("not qrels")
    data = load_beir(f, None)
    assert list(data.splits) == ["dev", "test", "train"]
    assert data.split("dev").qrels == {"q1": {"d2": 1}}
    assert data.name == "mine"
    data = load_dataset("mine", str(f), None, eval_split="test")
    assert list(data.splits) == ["dev", "test", "train"]


def test_splits_none_without_qrels_files_names_the_folder(tmp_path):
    f = _write(tmp_path / "mine", DOCS, QUERIES, {})
    with pytest.raises(DataError, match=r"mine/qrels: no <split>.tsv qrels file found"):
        load_dataset("mine", str(f), None, eval_split="test")


def test_beir_config_names_the_dataset_after_its_folder(tmp_path, monkeypatch):
    assert _beir_cfg(str(tmp_path / "my-beir") + "/").data.name == "my-beir"
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert _beir_cfg(".").data.name == "here"  # `data.path=.` names the folder it means, not ""
    cfg = _beir_cfg(str(tmp_path / "my-beir"))
    cfg.data.name = "other"  # an explicit name wins
    assert cfg.data.name == "other"
    assert _beir_cfg("x").data.splits is None and _beir_cfg("x").data.unknown_qrels == "error"


def test_beir_config_without_path_says_which_key_to_set():
    with pytest.raises(
        InterpolationResolutionError, match=r"data.path is not set: data=beir needs data.path"
    ):
        _ = _beir_cfg(None).data.name


def test_auto_splits_eval_split_missing_names_folder_splits_and_fix(tmp_path):
    qrels = {"train": HEADER + "q1\td1\t1\n", "dev": HEADER + "q2\td2\t1\n"}
    f = _write(tmp_path / "mine", DOCS, QUERIES, qrels)
    with pytest.raises(DataError) as e:
        load_dataset("mine", str(f), None, eval_split="test")
    msg = str(e.value)
    assert str(f) in msg and "data.eval_split='test'" in msg and "['dev', 'train']" in msg
    assert "set data.eval_split=<one of them>" in msg
    assert load_dataset("mine", str(f), None, eval_split="dev").split("dev").qrels == {"q2": {"d2": 1}}


def test_auto_splits_accept_an_eval_split_carved_from_train(tmp_path):
    f = write_toy(tmp_path / "toy", seed=0)
    (f / "qrels" / "test.tsv").unlink()
    data = load_dataset("toy", str(f), None, eval_split="dev", dev_from_train={"fraction": 0.25, "seed": 1})
    assert sorted(data.splits) == ["dev", "train"]


def test_auto_splits_ignore_budget_entries_for_absent_splits(tmp_path):
    """A budget's max_queries is written for train/dev/test; a test-only folder must still load."""
    f = write_toy(tmp_path / "toy", seed=0)
    (f / "qrels" / "train.tsv").unlink()
    data = load_dataset("toy", str(f), None, eval_split="test", max_queries={"train": 3, "dev": 2, "test": 4})
    assert list(data.splits) == ["test"] and len(data.split("test").qrels) == 4
    with pytest.raises(DataError, match="split 'train' is not available"):  # explicit splits: still strict
        load_dataset("toy", str(f), ["test"], eval_split="test", max_queries={"train": 3})


# --- data.unknown_qrels: error | drop ----------------------------------------------------------------

UNKNOWN_ROWS = HEADER + "q1\td1\t1\nq1\td9\t1\nq2\td2\t1\nq2\td8\t0\nq7\td1\t1\nq8\td9\t1\n"


def test_unknown_qrels_error_points_at_drop(tmp_path):
    f = _write(tmp_path, DOCS, QUERIES, {"test": UNKNOWN_ROWS})
    with pytest.raises(DataError, match=r"test.tsv:3: qrels name document 'd9'.*data.unknown_qrels=drop"):
        load_beir(f, ["test"])
    ok = _write(tmp_path / "ok", DOCS, QUERIES, {"test": HEADER + "q1\td1\t1\n"})
    assert "dropped_qrels" not in load_beir(ok, ["test"]).describe()  # the default: describe() as it was


def test_unknown_qrels_drop_counts_docs_and_queries_per_split(tmp_path, caplog):
    f = _write(tmp_path, DOCS, QUERIES, {"test": UNKNOWN_ROWS, "train": HEADER + "q1\td1\t1\n"})
    with caplog.at_level(logging.WARNING, logger="resume.data"):
        data = load_dataset("x", str(f), ["train", "test"], eval_split="test", unknown_qrels="drop")
    assert data.split("test").qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert data.split("test").queries == {"q1": "first", "q2": "second"}
    # q8/d9 names both: counted once, as an unknown query (the check made first)
    expected = {
        "test": {"unknown_docs": 2, "unknown_queries": 2},
        "train": {"unknown_docs": 0, "unknown_queries": 0},
    }
    assert data.describe()["dropped_qrels"] == expected
    assert json.loads(json.dumps(data.describe()))["dropped_qrels"] == expected  # as results.json stores it
    assert [n for n in data.notes if "dropped" in n] == [
        (
            "test: 2 qrels rows naming documents absent from corpus.jsonl and 2 naming queries absent from "
            "queries.jsonl dropped (data.unknown_qrels=drop)"
        )
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # train dropped nothing: no warning for it
    assert str(f / "qrels" / "test.tsv") in warnings[0] and "line 3: 'q1\\td9\\t1'" in warnings[0]


def test_unknown_qrels_drop_of_every_row_names_the_file(tmp_path):
    f = _write(tmp_path, DOCS, QUERIES, {"test": HEADER + "q1\td9\t1\nq7\td1\t1\n"})
    with pytest.raises(
        DataError, match=r"qrels/test.tsv: all 2 judgements were dropped under data.unknown_qrels"
    ):
        load_beir(f, ["test"], unknown_qrels="drop")


@pytest.mark.parametrize("value", ["skip", "Drop", None])
def test_unknown_qrels_bad_value_names_the_key(tmp_path, value):
    f = _write(tmp_path, DOCS, QUERIES, {"test": HEADER + "q1\td1\t1\n"})
    with pytest.raises(DataError, match=rf"data.unknown_qrels={value!r} is not one of \['error', 'drop'\]"):
        load_dataset("x", str(f), ["test"], eval_split="test", unknown_qrels=value)
    with pytest.raises(DataError, match=r"data.unknown_qrels="):
        load_beir(f, ["test"], unknown_qrels=value)


def test_every_data_config_exposes_unknown_qrels():
    for p in sorted((CONFIG_DIR / "data").glob("*.yaml")):
        assert OmegaConf.load(p).unknown_qrels == "error", p.name
