"""Load BEIR folders (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`) with strict validation.

Same semantics as `beir.datasets.data_loader.GenericDataLoader` (a split's queries are the
queries named in its qrels; grades are ints), but every malformed input raises a `DataError`
naming the file and line, instead of a KeyError later or a silently dropped row. One
difference on purpose: BEIR always skips the first qrels line as a header; we skip it only
when it *is* a header (its grade column is not an integer), so header-less qrels files
(such as the TREC DL19 subset) lose no judgement.

Qrels rows naming a document or query absent from corpus.jsonl / queries.jsonl are an error by
default (`unknown_qrels="error"`); some public BEIR copies ship such rows, so
`unknown_qrels="drop"` skips them instead and counts them per split (`RetrievalData.dropped_qrels`,
recorded by `describe()`), which keeps the loss visible in every result.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]

UNKNOWN_QRELS = ("error", "drop")  # the values of data.unknown_qrels


class DataError(ValueError):
    """Malformed or inconsistent dataset input; the message names the file and line."""


def full_text(title: str, text: str) -> str:
    """A document as dense retrievers read it: title and body joined by a space (BEIR's convention)."""
    return f"{title} {text}".strip() if title else text


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """Title and body joined by a space, as BEIR feeds dense models."""
        return full_text(self.title, self.text)


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
    # split -> {"unknown_docs": n, "unknown_queries": m}: qrels rows skipped under unknown_qrels="drop";
    # None when rows naming unknown ids are an error (then `describe()` output is unchanged)
    dropped_qrels: dict[str, dict[str, int]] | None = None

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

    def lead_texts(self, words: int) -> dict[str, str]:
        """Doc id -> the first `words` words of its full text (the `lead` view: an extractive control)."""
        return {d: " ".join(text.split()[:words]) for d, text in self.full_texts().items()}

    def describe(self) -> dict[str, object]:
        """What every result records about the data it was computed on."""
        out: dict[str, object] = {
            "name": self.name,
            "source": self.source,
            "corpus_size": len(self.corpus),
            "splits": {s: len(sp.queries) for s, sp in self.splits.items()},
            "notes": list(self.notes),
        }
        if self.dropped_qrels is not None:
            out["dropped_qrels"] = {s: dict(c) for s, c in self.dropped_qrels.items()}
        return out


def check_unknown_qrels(value: str) -> str:
    """Validate a `data.unknown_qrels` value (returned unchanged)."""
    if value not in UNKNOWN_QRELS:
        raise DataError(
            f"data.unknown_qrels={value!r} is not one of {list(UNKNOWN_QRELS)}: set data.unknown_qrels=error "
            f"(a qrels row naming a document or query absent from the folder is an error) or "
            f"data.unknown_qrels=drop (such rows are skipped and counted in results.json)"
        )
    return value


def available_splits(folder: str | Path) -> list[str]:
    """The qrels splits of a BEIR folder: the stems of `qrels/*.tsv`, sorted."""
    qrels_dir = Path(folder) / "qrels"
    if not qrels_dir.is_dir():
        return []
    # Dotfiles are skipped: unzipping a BEIR archive made on macOS leaves AppleDouble files such
    # as `._test.tsv` next to the real ones, which are not qrels.
    return sorted(p.stem for p in qrels_dir.glob("*.tsv") if p.is_file() and not p.name.startswith("."))


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


def load_qrels(
    path: Path,
    corpus: Mapping[str, Document],
    queries: Mapping[str, str],
    unknown_qrels: str = "error",
    dropped: dict[str, int] | None = None,
) -> Qrels:
    """Read a 3-column TSV (query-id, corpus-id, score); an optional header line is detected.

    A row naming a query not in `queries` or a document not in `corpus` raises, unless
    `unknown_qrels="drop"`: then it is skipped and counted into `dropped` (filled in place with
    "unknown_docs" and "unknown_queries"; a row naming both counts as an unknown query, the check
    made first, so the two counts add up to the rows dropped).
    """
    check_unknown_qrels(unknown_qrels)
    qrels: Qrels = {}
    counts = {"unknown_docs": 0, "unknown_queries": 0}
    example = ""  # the first dropped row, for the warning
    fix = "; set data.unknown_qrels=drop to skip such rows (they are counted in results.json)"
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
            unknown = None
            if qid not in queries:
                unknown = "unknown_queries"
                if unknown_qrels == "error":
                    raise DataError(
                        f"{path}:{lineno}: qrels name query {qid!r}, which is not in queries.jsonl{fix}"
                    )
            elif did not in corpus:
                unknown = "unknown_docs"
                if unknown_qrels == "error":
                    raise DataError(
                        f"{path}:{lineno}: qrels name document {did!r}, which is not in corpus.jsonl{fix}"
                    )
            if unknown is not None:
                counts[unknown] += 1
                if not example:
                    row = line.rstrip("\n")
                    example = f"line {lineno}: {row!r}"
                continue
            qrels.setdefault(qid, {})[did] = grade
    n_dropped = counts["unknown_docs"] + counts["unknown_queries"]
    if dropped is not None:
        dropped.update(counts)
    if n_dropped:
        log.warning(
            "%s: dropped %d qrels row(s) naming documents absent from corpus.jsonl and %d naming queries "
            "absent from queries.jsonl (data.unknown_qrels=drop); first: %s",
            path,
            counts["unknown_docs"],
            counts["unknown_queries"],
            example,
        )
    if not qrels:
        if n_dropped:
            raise DataError(
                f"{path}: all {n_dropped} judgements were dropped under data.unknown_qrels=drop "
                f"({counts['unknown_docs']} name documents absent from corpus.jsonl, "
                f"{counts['unknown_queries']} name queries absent from queries.jsonl; first: {example}); "
                f"the qrels do not match this folder's corpus.jsonl/queries.jsonl (truncated or mismatched "
                f"files?): check the folder data.path points at"
            )
        raise DataError(f"{path}: no judgements in this qrels file")
    return qrels


def load_beir(
    folder: str | Path,
    splits: list[str] | None,
    name: str | None = None,
    unknown_qrels: str = "error",
) -> RetrievalData:
    """Load a BEIR folder with the given qrels splits; every split must exist.

    `splits=None` loads every `qrels/*.tsv` of the folder (sorted by name). `unknown_qrels` is
    "error" or "drop" (see `load_qrels`); with "drop" the per-split counts go into `dropped_qrels`.
    """
    check_unknown_qrels(unknown_qrels)
    folder = Path(folder)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    for p in (corpus_path, queries_path):
        if not p.is_file():
            raise DataError(
                f"{p}: file not found (expected a BEIR folder with corpus.jsonl, queries.jsonl, qrels/)"
            )
    if splits is None:
        splits = available_splits(folder)
        if not splits:
            raise DataError(
                f"{folder / 'qrels'}: no <split>.tsv qrels file found, and data.splits=null loads every one; "
                f"add qrels/<split>.tsv files (query-id, corpus-id, score) or point data.path at a BEIR "
                f"folder"
            )
    missing = [s for s in splits if not (folder / "qrels" / f"{s}.tsv").is_file()]
    if missing:
        have = available_splits(folder)
        raise DataError(
            f"{folder / 'qrels'}: split(s) {missing} not found (available: {have}); fix data.splits"
        )
    corpus = load_corpus(corpus_path)
    queries = load_queries(queries_path)
    data = RetrievalData(name=name or folder.name, corpus=corpus, queries=queries, source=str(folder))
    if unknown_qrels == "drop":
        data.dropped_qrels = {}
    for s in splits:
        dropped: dict[str, int] = {}
        qrels = load_qrels(folder / "qrels" / f"{s}.tsv", corpus, queries, unknown_qrels, dropped)
        data.splits[s] = Split(name=s, queries={q: queries[q] for q in qrels}, qrels=qrels)
        if data.dropped_qrels is not None:
            data.dropped_qrels[s] = dropped
            if dropped["unknown_docs"] or dropped["unknown_queries"]:
                n_docs, n_queries = dropped["unknown_docs"], dropped["unknown_queries"]
                data.notes.append(
                    f"{s}: {n_docs} qrels rows naming documents absent from corpus.jsonl and {n_queries} "
                    f"naming queries absent from queries.jsonl dropped (data.unknown_qrels=drop)"
                )
    return data
