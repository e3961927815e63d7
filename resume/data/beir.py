"""Load BEIR folders (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`) with strict validation.

Same semantics as `beir.datasets.data_loader.GenericDataLoader` (a split's queries are the
queries named in its qrels; grades are ints), but every malformed input raises a `DataError`
naming the file and line, instead of a KeyError later or a silently dropped row. One
difference on purpose: BEIR always skips the first qrels line as a header; we skip it only
when it *is* a header (its grade column is not an integer), so header-less qrels files
(such as the TREC DL19 subset) lose no judgement.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

Qrels = dict[str, dict[str, int]]


class DataError(ValueError):
    """Malformed or inconsistent dataset input; the message names the file and line."""


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """Title and body joined by a space, as BEIR feeds dense models."""
        return f"{self.title} {self.text}".strip() if self.title else self.text


@dataclass(frozen=True)
class Split:
    """The queries of one split and their judgements."""

    name: str
    queries: dict[str, str]
    qrels: Qrels


@dataclass
class RetrievalData:
    """A corpus, its queries and per-split judgements."""

    name: str
    corpus: dict[str, Document]
    queries: dict[str, str]
    splits: dict[str, Split] = field(default_factory=dict)
    source: str = ""
    notes: list[str] = field(default_factory=list)  # how the data was derived (subset, dev carve)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(
                f"split {name!r} is not available for dataset {self.name!r} (have {sorted(self.splits)}); "
                f"check data.splits / data.eval_split"
            )
        return self.splits[name]

    def full_texts(self) -> dict[str, str]:
        """Doc id -> title and body as the retriever reads a document (the baseline's index texts)."""
        return {d: doc.full_text for d, doc in self.corpus.items()}

    def describe(self) -> dict[str, object]:
        """What every result records about the data it was computed on."""
        return {
            "name": self.name,
            "source": self.source,
            "corpus_size": len(self.corpus),
            "splits": {s: len(sp.queries) for s, sp in self.splits.items()},
            "notes": list(self.notes),
        }


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _require_id(obj: dict, path: Path, lineno: int) -> str:
    if "_id" not in obj:
        raise DataError(f"{path}:{lineno}: missing '_id' field")
    return str(obj["_id"])


def load_corpus(path: Path) -> dict[str, Document]:
    corpus: dict[str, Document] = {}
    for lineno, obj in _iter_jsonl(path):
        doc_id = _require_id(obj, path, lineno)
        title, text = str(obj.get("title") or "").strip(), str(obj.get("text") or "").strip()
        if not text and not title:
            raise DataError(f"{path}:{lineno}: document {doc_id!r} has an empty text and title")
        if doc_id in corpus:
            raise DataError(f"{path}:{lineno}: duplicate document id {doc_id!r}")
        corpus[doc_id] = Document(title=title, text=text)
    if not corpus:
        raise DataError(f"{path}: the corpus is empty")
    return corpus


def load_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for lineno, obj in _iter_jsonl(path):
        qid = _require_id(obj, path, lineno)
        text = str(obj.get("text") or "").strip()
        if not text:
            raise DataError(f"{path}:{lineno}: query {qid!r} has an empty text")
        if qid in queries:
            raise DataError(f"{path}:{lineno}: duplicate query id {qid!r}")
        queries[qid] = text
    return queries


def load_qrels(path: Path, corpus: Mapping[str, Document], queries: Mapping[str, str]) -> Qrels:
    """Read a 3-column TSV (query-id, corpus-id, score); an optional header line is detected."""
    qrels: Qrels = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) == 4:  # TREC qrels style: qid iter docid grade
                cols = [cols[0], cols[2], cols[3]]
            if len(cols) != 3:
                raise DataError(
                    f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                    f"got {len(cols)}"
                )
            qid, did, grade_s = (c.strip() for c in cols)
            try:
                grade = int(grade_s)
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise DataError(f"{path}:{lineno}: relevance grade {grade_s!r} is not an integer") from None
            if qid not in queries:
                raise DataError(f"{path}:{lineno}: qrels name query {qid!r}, which is not in queries.jsonl")
            if did not in corpus:
                raise DataError(f"{path}:{lineno}: qrels name document {did!r}, which is not in corpus.jsonl")
            qrels.setdefault(qid, {})[did] = grade
    if not qrels:
        raise DataError(f"{path}: no judgements in this qrels file")
    return qrels


def load_beir(folder: str | Path, splits: list[str], name: str | None = None) -> RetrievalData:
    """Load a BEIR folder with the given qrels splits; every split must exist."""
    folder = Path(folder)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    for p in (corpus_path, queries_path):
        if not p.is_file():
            raise DataError(f"{p}: file not found (expected a BEIR folder with corpus.jsonl, queries.jsonl, qrels/)")
    missing = [s for s in splits if not (folder / "qrels" / f"{s}.tsv").is_file()]
    if missing:
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise DataError(
            f"{folder / 'qrels'}: split(s) {missing} not found (available: {have}); fix data.splits"
        )
    corpus = load_corpus(corpus_path)
    queries = load_queries(queries_path)
    data = RetrievalData(name=name or folder.name, corpus=corpus, queries=queries, source=str(folder))
    for s in splits:
        qrels = load_qrels(folder / "qrels" / f"{s}.tsv", corpus, queries)
        data.splits[s] = Split(name=s, queries={q: queries[q] for q in qrels}, qrels=qrels)
    return data
