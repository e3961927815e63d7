"""THE KILL TEST: a corpus summarization killed half-way resumes without generating any document twice.

A child process (forked, so it skips re-importing torch; it builds its own summarizer from
the config) summarizes 12 documents in batches of 3 and is SIGKILLed while writing its
third batch (two batches complete on disk, the third torn in the middle of a line). The
rerun must generate exactly the missing documents, once each, and end with the same
summaries as an uninterrupted run in a fresh cache.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from resume.data.beir import load_corpus
from resume.summaries import summarize_corpus, summary_stats
from resume.summarizer.generate import Completion, GenerationParams
from resume.summarizer.module import SummarizerModule  # imported before the fork: the child reuses it
from resume.utils.config import compose_node

CHILD = Path(__file__).parent / "helpers" / "summarize_child.py"
N_DOCS, BATCH = 12, 3


class CountingBackend:
    """Wraps a backend and records every prompt it generates for."""

    def __init__(self, inner):
        self.inner = inner
        self.prompts: list[str] = []
        self.calls = 0

    def generate(self, prompts, params):
        self.calls += 1
        self.prompts.extend(prompts)
        return self.inner.generate(prompts, params)

    def describe(self):  # the same engine: the same summary cache key
        return self.inner.describe()


def write_corpus(path: Path) -> Path:
    words = [
        "protein",
        "cell",
        "gene",
        "vaccine",
        "trial",
        "dose",
        "risk",
        "cohort",
        "signal",
        "tumor",
        "insulin",
        "neuron",
    ]
    with path.open("w", encoding="utf-8") as f:
        for i in range(N_DOCS):
            text = " ".join(words[(i * 5 + j) % len(words)] for j in range(4 + 3 * i))
            f.write(json.dumps({"_id": f"doc{i}", "title": f"Study {i}", "text": text}) + "\n")
    return path


def tiny_summarizer() -> SummarizerModule:
    cfg = OmegaConf.create({"seed": 0, "summarizer": compose_node("summarizer", ["summarizer=tiny"])})
    return instantiate(cfg.summarizer)


def _load_child_module():
    spec = importlib.util.spec_from_file_location("summarize_child", CHILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_child(corpus: Path, cache_dir: Path):
    """A forked process (no re-import of torch: this suite must stay fast) that builds its own
    summarizer and stops mid-write of batch 3; returns (process, event set when it is there)."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(
        target=_load_child_module().run, args=(corpus, cache_dir, BATCH, 3, ready.set), daemon=True
    )
    proc.start()
    return proc, ready


def kill_when_ready(proc, ready) -> None:
    try:
        deadline = time.monotonic() + 120
        while not ready.wait(timeout=0.05):
            assert proc.is_alive(), f"child died (exit code {proc.exitcode}) before its third batch"
            assert time.monotonic() < deadline, "child never reached its third batch"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()


def test_killed_run_resumes_without_generating_any_document_twice(tmp_path):
    corpus_path = write_corpus(tmp_path / "corpus.jsonl")
    docs = load_corpus(corpus_path)
    cache_dir = tmp_path / "cache"
    child, ready = start_child(corpus_path, cache_dir)
    try:  # meanwhile, the uninterrupted reference run, in a fresh cache
        summarizer = tiny_summarizer()
        counting = CountingBackend(summarizer.backend)
        summarizer.backend = counting
        fresh = summarize_corpus(summarizer, docs, tmp_path / "fresh", batch_size=BATCH, progress=False)
        assert len(counting.prompts) == N_DOCS
    finally:
        kill_when_ready(child, ready)

    [folder] = list((cache_dir / "summaries").iterdir())
    raw = (folder / "summaries.jsonl").read_bytes()
    n_whole = raw.count(b"\n")  # 2 batches, plus the lines of batch 3 written whole before the tear
    assert 2 * BATCH <= n_whole < 3 * BATCH and not raw.endswith(b"\n"), "expected 2 batches + a torn batch"
    done_before = {json.loads(line)["doc_id"] for line in raw.split(b"\n")[:-1]}

    counting.prompts.clear()
    prompt_to_doc = dict(zip(summarizer.prompts_for([(d.title, d.text) for d in docs.values()]), docs))
    resumed = summarize_corpus(summarizer, docs, cache_dir, batch_size=BATCH, progress=False)

    generated = Counter(prompt_to_doc[p] for p in counting.prompts)
    assert max(generated.values()) == 1, f"documents generated twice: {generated}"
    assert set(generated) == set(docs) - done_before and len(generated) == N_DOCS - n_whole
    assert resumed.n_cached == n_whole and resumed.n_generated == N_DOCS - n_whole
    assert [p.name for p in (cache_dir / "summaries").iterdir()] == [folder.name]  # same key as the child's
    lines = (folder / "summaries.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["doc_id"] for line in lines) == sorted(docs)  # the torn line is gone
    assert fresh.records == resumed.records and fresh.texts == resumed.texts

    calls = counting.calls
    again = summarize_corpus(summarizer, docs, cache_dir, batch_size=BATCH, progress=False)
    assert counting.calls == calls and again.n_cached == N_DOCS and again.records == resumed.records


# --------------------------------------------------------------------------- fallbacks and stats
class ScriptedBackend:
    """Returns a fixed completion per prompt, chosen by a word of the document."""

    def __init__(self, by_marker: dict[str, str]):
        self.by_marker = by_marker

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            text = next(t for m, t in self.by_marker.items() if m in p)
            out.append(
                [
                    Completion(
                        text=text, token_ids=list(range(len(text.split()))), prompt_ids=[1], finished=True
                    )
                ]
            )
        return out


class Doc:
    def __init__(self, title: str, text: str):
        self.title, self.text = title, text


@pytest.fixture(scope="module")
def scripted():
    s = tiny_summarizer()
    s.backend = ScriptedBackend(
        {
            "alpha": "the facts </think> one two three four",
            "beta": "<think> reasoning that never closes",
            "gamma": "thought </think>",
        }
    )
    return s


DOCS = {"a": Doc("A", "alpha text"), "b": Doc("B", "beta text"), "c": Doc("C", "gamma text")}


@pytest.mark.parametrize(
    "fallback, expected_b",
    [("completion", "reasoning that never closes"), ("document", "B beta text"), ("empty", "")],
)
def test_fallback_texts_and_stats(scripted, tmp_path, fallback, expected_b):
    result = summarize_corpus(scripted, DOCS, tmp_path, batch_size=2, progress=False, fallback=fallback)
    assert result.texts == {"a": "one two three four", "b": expected_b, "c": ""}
    stats = summary_stats(result, count_tokens=lambda t: len(t.split()))
    assert stats["n_docs"] == 3 and stats["n_fallback"] == 1 and stats["fallback"] == fallback
    assert stats["separator_failure_rate"] == pytest.approx(1 / 3)
    assert stats["n_empty"] == (2 if fallback == "empty" else 1)  # c's summary is empty after </think>
    assert stats["summary_tokens_max"] == 4 and stats["summary_tokens_p50"] == 2.0  # over a and c: [4, 0]
    assert stats["fallback_leaks_document"] == (fallback == "document")
    assert ("warning" in stats) == (fallback == "document")
    assert (
        stats["generated_tokens_total"] == 7 + 5 + 2
        and stats["cache_hits"] == 0
        and stats["n_generated"] == 3
    )
    assert stats["tokens_per_s"] > 0 and stats["docs_per_s"] > 0


def test_cache_hits_and_bad_arguments(scripted, tmp_path):
    summarize_corpus(scripted, DOCS, tmp_path, progress=False)
    second = summarize_corpus(scripted, DOCS, tmp_path, progress=False)
    stats = summary_stats(second, count_tokens=len)
    assert stats["cache_hits"] == 3 and stats["n_generated"] == 0 and stats["tokens_per_s"] is None
    with pytest.raises(ValueError, match="fallback"):
        summarize_corpus(scripted, DOCS, tmp_path, fallback="baseline")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_return_sequences"):
        summarize_corpus(
            scripted, DOCS, tmp_path, params=GenerationParams(do_sample=True, num_return_sequences=2)
        )


def test_changed_document_is_regenerated(scripted, tmp_path):
    summarize_corpus(scripted, DOCS, tmp_path, progress=False)
    changed = {**DOCS, "a": Doc("A", "alpha text, revised")}
    result = summarize_corpus(scripted, changed, tmp_path, progress=False)
    assert result.n_generated == 1 and result.n_cached == 2
