"""The summary cache: one JSONL file per (summarizer fingerprint, decoding settings, prompt).

Layout: `<root>/summaries/<label>-<key>/summaries.jsonl` plus `meta.json`, which names the
parts the key hashes (model, fingerprint, generation settings, separator, prompt) so a
person can tell folders apart. Each line is one document:

    {"doc_id": ..., "doc_hash": ..., "completion": ..., "summary": ... | null,
     "has_separator": ..., "num_generated_tokens": ...}

Crash safety: records are appended batch by batch, each batch flushed and fsync'ed, so a
killed run loses at most the batch in flight. A line is committed once its newline is on
disk: on open, a last line without one (a write cut by the kill) is reported and cut off
the file, and its document is generated again. Any other damage (unparsable line, missing
field, wrong type) raises `SummaryCacheError` with the file and line: silently skipping it
would hide corruption and regenerate under the user's feet. A record whose `doc_hash`
differs from the current document's text is stale (the document changed): it is ignored
with a warning, so that document is regenerated.

Several writers (ranks of a sharded summarization, jobs of an array) share a folder by each
appending to its own file, `summaries.<shard>.jsonl` (`shard="rank3-of-8"`); readers merge
`summaries.jsonl` and every shard file. A reader never repairs another writer's file: a last
line without newline there is a write in flight (or a killed writer's torn line, which that
shard's next run cuts off) and is left out. One writer per file at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from resume.utils.io import atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "resume.summaries/1"
FIELDS: dict[str, tuple[type, ...]] = {
    "doc_id": (str,),
    "doc_hash": (str,),
    "completion": (str,),
    "summary": (str, type(None)),
    "has_separator": (bool,),
    "num_generated_tokens": (int,),
}


class SummaryCacheError(RuntimeError):
    """A cache file that cannot be trusted; the message names the file, the line and the fix."""


def doc_hash(title: str, text: str) -> str:
    """Hash of what the summarizer reads of a document (title and text)."""
    h = hashlib.blake2b(digest_size=8)
    h.update((title or "").encode())
    h.update(b"\x00")
    h.update(text.encode())
    return h.hexdigest()


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """Stable hash of the key parts (JSON with sorted keys)."""
    blob = json.dumps(key_parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def _check_record(rec: Any) -> str | None:
    """None if `rec` is a valid record, else what is wrong with it."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    missing = [f for f in FIELDS if f not in rec]
    if missing:
        return f"missing fields {missing}"
    wrong = [f"{f} ({type(rec[f]).__name__})" for f, types in FIELDS.items() if not isinstance(rec[f], types)]
    if isinstance(rec["num_generated_tokens"], bool):
        wrong.append("num_generated_tokens (bool)")
    if wrong:
        return f"fields of the wrong type: {wrong}"
    if rec["has_separator"] != (rec["summary"] is not None):
        return "has_separator disagrees with summary (null iff no separator)"
    return None


class SummaryCache:
    """The summaries of one summarizer state under one set of decoding settings.

    `key_parts` decide the folder (everything that changes a completion); `label` (a model
    name) only prefixes the folder name for readability; `info` is recorded in `meta.json`
    without being part of the key.
    """

    def __init__(
        self,
        root: str | Path,
        key_parts: Mapping[str, Any],
        label: str = "",
        info: Mapping[str, Any] | None = None,
        shard: str | None = None,
    ) -> None:
        if shard is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", shard):
            raise ValueError(f"summary cache shard name {shard!r} must be letters, digits, '-' or '_'")
        self.key_parts = dict(key_parts)
        self.key = cache_key(self.key_parts)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[-48:]
        # The key alone decides the folder: one written under another label (the same weights loaded
        # from a hub name in one process and from a checkpoint folder in another) is the same cache.
        base = Path(root) / "summaries"
        existing = sorted(base.glob(f"*-{self.key}")) + (
            [base / self.key] if (base / self.key).is_dir() else []
        )
        self.folder = existing[0] if existing else base / (f"{slug}-{self.key}" if slug else self.key)
        self.shard = shard
        self.path = self.folder / (
            f"summaries.{shard}.jsonl" if shard else "summaries.jsonl"
        )  # this writer's file
        self.meta_path = self.folder / "meta.json"
        self.dropped_partial: str | None = None  # the cut-off last line found on open, if any
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_meta(label, info)
        self._repair_tail()

    # ------------------------------------------------------------------ open
    def _write_meta(self, label: str, info: Mapping[str, Any] | None) -> None:
        # Round-trip through JSON so the comparison below sees what the file holds.
        parts = json.loads(json.dumps(self.key_parts, sort_keys=True, default=str))
        if self.meta_path.is_file():
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            if meta.get("key_parts") != parts:
                raise SummaryCacheError(
                    f"{self.meta_path}: key parts differ from this run's for the same key {self.key} "
                    "(edited by hand?); delete the folder to regenerate"
                )
            return
        atomic_write_json(
            self.meta_path,
            {
                "format": FORMAT,
                "key": self.key,
                "label": label,
                "key_parts": parts,
                "info": dict(info or {}),
                "fields": list(FIELDS),
            },
        )

    def _repair_tail(self) -> None:
        """Cut a last line that has no newline (a write interrupted by a kill) off the file."""
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            keep = data.rfind(b"\n") + 1
            self.dropped_partial = data[keep:].decode("utf-8", errors="replace")
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        lineno = data[:keep].count(b"\n") + 1
        log.warning(
            "%s:%d: dropped a partial last line (%d bytes, cut by an interrupted write); its document "
            "will be summarized again",
            self.path,
            lineno,
            size - keep,
        )

    # ------------------------------------------------------------------ read
    def files(self) -> list[Path]:
        """Every file of this folder: `summaries.jsonl` first, then the shard files by name."""
        main = self.folder / "summaries.jsonl"
        shards = sorted(self.folder.glob("summaries.*.jsonl"))
        return ([main] if main.is_file() else []) + shards

    def records(self) -> Iterable[tuple[int, dict[str, Any]]]:
        """(line number, record) for every line of every file, validated; raises `SummaryCacheError`
        on damage (the message names the file and line)."""
        for path in self.files():
            yield from self._file_records(path)

    def _file_records(self, path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.endswith("\n"):
                    if path != self.path:  # another writer's line in flight (or torn): not committed
                        return
                    raise SummaryCacheError(  # our own file was repaired on open: someone else writes it
                        f"{path}:{lineno}: line without newline; is another run writing this file?"
                    )
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SummaryCacheError(
                        f"{path}:{lineno}: not valid JSON ({e.msg}); the cache is damaged: delete that "
                        f"line (its document is then regenerated) or the folder {self.folder}"
                    ) from e
                problem = _check_record(rec)
                if problem:
                    raise SummaryCacheError(
                        f"{path}:{lineno}: {problem}; expected fields {list(FIELDS)}. Delete that line "
                        f"(its document is then regenerated) or the folder {self.folder}"
                    )
                yield lineno, rec

    def done(self, hashes: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """doc_id -> its latest record. With `hashes` (doc_id -> `doc_hash` of the current text),
        records of a changed document are left out (warned about), so it is generated again."""
        out: dict[str, dict[str, Any]] = {}
        stale: dict[str, int] = {}
        for lineno, rec in self.records():
            doc_id = rec["doc_id"]
            current = hashes.get(doc_id) if hashes is not None else None
            if current is not None and rec["doc_hash"] != current:
                stale[doc_id] = lineno
                continue
            out[doc_id] = rec
            stale.pop(doc_id, None)
        stale = {d: n for d, n in stale.items() if d not in out}
        if stale:
            examples = ", ".join(f"{d!r} (line {n})" for d, n in list(stale.items())[:5])
            log.warning(
                "%s: %d cached summaries were made from a different text of their document (changed since): "
                "%s; those documents will be summarized again",
                self.folder,
                len(stale),
                examples,
            )
        return out

    # ------------------------------------------------------------------ write
    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records and make them durable (flush + fsync) before returning."""
        lines = []
        for rec in records:
            problem = _check_record(dict(rec))
            if problem:
                raise ValueError(
                    f"refusing to write an invalid summary record ({problem}): {dict(rec)!r:.200}"
                )
            lines.append(json.dumps({f: rec[f] for f in FIELDS}, ensure_ascii=False) + "\n")
        if not lines:
            return
        created = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        if created:  # make the new file's directory entry durable too
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __repr__(self) -> str:
        return f"SummaryCache({str(self.path)!r})"
