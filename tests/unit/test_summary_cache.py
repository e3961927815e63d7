"""The summary cache: round trip, crash repair, corruption errors, stale documents, key isolation."""

from __future__ import annotations

import json
import logging

import pytest

from resume.summaries.cache import SummaryCache, SummaryCacheError, doc_hash

KEY = {
    "fingerprint": "abc123",
    "generation": "greedy-max16",
    "prompt": {"user": "{text}"},
    "separator": "</think>",
}


def rec(doc_id: str, text: str = "body", summary: str | None = "short summary") -> dict:
    completion = "thinking </think> " + summary if summary is not None else "thinking only"
    return {
        "doc_id": doc_id,
        "doc_hash": doc_hash("", text),
        "completion": completion,
        "summary": summary,
        "has_separator": summary is not None,
        "num_generated_tokens": 7,
    }


def test_round_trip_and_meta(tmp_path):
    cache = SummaryCache(tmp_path, KEY, label="HuggingFaceTB/SmolLM2-135M-Instruct", info={"note": "x"})
    assert cache.done() == {}
    cache.append([rec("d1"), rec("d2", summary=None)])
    cache.append([rec("d3", summary="ünïcode ✓")])
    reopened = SummaryCache(tmp_path, KEY, label="HuggingFaceTB/SmolLM2-135M-Instruct")
    done = reopened.done()
    assert list(done) == ["d1", "d2", "d3"]
    assert done["d1"] == rec("d1") and done["d2"]["summary"] is None
    assert done["d3"]["summary"] == "ünïcode ✓"
    assert reopened.path == cache.path and cache.path.name == "summaries.jsonl"
    assert cache.path.parent.name.startswith("HuggingFaceTB_SmolLM2-135M-Instruct-")
    meta = json.loads((cache.path.parent / "meta.json").read_text())
    assert meta["key_parts"] == KEY and meta["info"] == {"note": "x"}
    # standard JSONL: every line parses on its own
    assert [json.loads(line)["doc_id"] for line in cache.path.read_text().splitlines()] == ["d1", "d2", "d3"]


def test_partial_last_line_is_dropped_reported_and_cut(tmp_path, caplog):
    cache = SummaryCache(tmp_path, KEY)
    cache.append([rec("d1"), rec("d2")])
    with open(cache.path, "a", encoding="utf-8") as f:  # a write cut by a kill: no newline
        f.write(json.dumps(rec("d3"))[:25])
    with caplog.at_level(logging.WARNING, logger="resume.summaries.cache"):
        reopened = SummaryCache(tmp_path, KEY)
    assert "partial last line" in caplog.text and "summaries.jsonl:3" in caplog.text
    assert reopened.dropped_partial is not None and reopened.dropped_partial.startswith('{"doc_id": "d3"')
    assert set(reopened.done()) == {"d1", "d2"}
    reopened.append([rec("d3")])  # the next append starts on a fresh line
    assert set(SummaryCache(tmp_path, KEY).done()) == {"d1", "d2", "d3"}


def test_complete_json_without_newline_is_still_partial(tmp_path):
    cache = SummaryCache(tmp_path, KEY)
    cache.append([rec("d1")])
    with open(cache.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec("d2")))  # the kill came between the record and its newline
    assert set(SummaryCache(tmp_path, KEY).done()) == {"d1"}


@pytest.mark.parametrize(
    "bad, expected",
    [
        ('{"doc_id": "x", "completion": ', "not valid JSON"),
        (json.dumps({k: v for k, v in rec("x").items() if k != "doc_hash"}), "missing fields ['doc_hash']"),
        (json.dumps({**rec("x"), "num_generated_tokens": "7"}), "wrong type"),
        (json.dumps({**rec("x"), "has_separator": False}), "has_separator disagrees"),
        ("", "not valid JSON"),
    ],
)
def test_damaged_middle_line_raises_with_file_and_line(tmp_path, bad, expected):
    cache = SummaryCache(tmp_path, KEY)
    cache.append([rec("d1")])
    with open(cache.path, "a", encoding="utf-8") as f:
        f.write(bad + "\n")
    cache.append([rec("d3")])
    with pytest.raises(SummaryCacheError) as err:
        SummaryCache(tmp_path, KEY).done()
    assert f"{cache.path}:2:" in str(err.value) and expected in str(err.value)


def test_append_refuses_invalid_records(tmp_path):
    cache = SummaryCache(tmp_path, KEY)
    with pytest.raises(ValueError, match="missing fields"):
        cache.append([{"doc_id": "d1"}])
    assert not cache.path.exists() or cache.path.read_text() == ""


def test_changed_document_is_not_done(tmp_path, caplog):
    cache = SummaryCache(tmp_path, KEY)
    cache.append([rec("d1", text="old text"), rec("d2", text="same")])
    current = {"d1": doc_hash("", "new text"), "d2": doc_hash("", "same")}
    with caplog.at_level(logging.WARNING, logger="resume.summaries.cache"):
        done = cache.done(current)
    assert set(done) == {"d2"}
    assert "different text" in caplog.text and "'d1' (line 1)" in caplog.text
    cache.append([rec("d1", text="new text", summary="regenerated")])  # regenerated later: now done
    assert cache.done(current)["d1"]["summary"] == "regenerated"


def test_keys_isolate_generation_settings_and_weights(tmp_path):
    base = SummaryCache(tmp_path, KEY)
    base.append([rec("d1")])
    other_params = SummaryCache(tmp_path, {**KEY, "generation": "greedy-max32"})
    other_weights = SummaryCache(tmp_path, {**KEY, "fingerprint": "def456"})
    other_prompt = SummaryCache(tmp_path, {**KEY, "prompt": {"user": "Summarize: {text}"}})
    folders = {c.path.parent for c in (base, other_params, other_weights, other_prompt)}
    assert len(folders) == 4
    assert other_params.done() == other_weights.done() == other_prompt.done() == {}
    assert (
        SummaryCache(tmp_path, dict(reversed(list(KEY.items())))).path == base.path
    )  # key order is irrelevant


def test_edited_meta_is_an_error(tmp_path):
    cache = SummaryCache(tmp_path, KEY)
    meta = json.loads(cache.meta_path.read_text())
    meta["key_parts"]["fingerprint"] = "tampered"
    cache.meta_path.write_text(json.dumps(meta))
    with pytest.raises(SummaryCacheError, match="meta.json"):
        SummaryCache(tmp_path, KEY)
