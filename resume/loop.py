"""The run: the only place that knows both models exist.

Experiments differ only in configuration: which corpus view is evaluated, how many
iterations of (GRPO, summarize, adapt) run, which phases are enabled. This module reads
those values; it never branches on an experiment's name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from resume.data import RetrievalData

log = logging.getLogger(__name__)


class Loop:
    def __init__(
        self,
        data: RetrievalData,
        retriever: Any,
        evaluator: Callable[..., dict[str, Any]],
        out_dir: str | Path,
        cache_dir: str | Path,
        eval_splits: Sequence[str],
        row_name: str,
        corpus_view: str = "documents",
        log_metrics: Callable[[Mapping[str, float], int | None], None] | None = None,
    ) -> None:
        if corpus_view not in ("documents", "summaries"):
            raise ValueError(f"corpus_view={corpus_view!r} must be 'documents' or 'summaries'")
        self.data = data
        self.retriever = retriever
        self.evaluator = evaluator
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self.eval_splits = [s for s in dict.fromkeys(eval_splits) if s in data.splits]
        self.row_name = row_name
        self.corpus_view = corpus_view
        self.log_metrics = log_metrics or (lambda metrics, step: None)

    def corpus_texts(self) -> dict[str, str]:
        """The corpus representation the final evaluation indexes."""
        if self.corpus_view == "documents":
            return {d: doc.full_text for d, doc in self.data.corpus.items()}
        raise NotImplementedError("corpus_view=summaries needs a summarizer (not built in this version)")

    def evaluate_row(self, row: str, texts: Mapping[str, str], view: str) -> list[dict[str, Any]]:
        rows = []
        for split in self.eval_splits:
            res = self.evaluator(self.retriever, self.data, split, texts, f"{row}-{view}", self.out_dir, self.cache_dir)
            res.update(row=row, view=view)
            self.log_metrics({f"eval/{split}/{k}": v for k, v in res["metrics"].items()}, None)
            rows.append(res)
        return rows

    def run(self) -> dict[str, Any]:
        return {"rows": self.evaluate_row(self.row_name, self.corpus_texts(), self.corpus_view)}
