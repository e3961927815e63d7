"""Algorithm 1, and the only place that knows both models exist.

    for t = 1..T:  GRPO(f_theta, reward = frozen g_phi_{t-1})   -> theta_t
                   S_t = f_theta_t(D)  (greedy, cached)
                   phi_t = contrastive(g_phi_{t-1}, (q, S_t))
                   evaluate on dev; stop when the improvement < epsilon

Experiments differ only in configuration (how many iterations, which phases are set,
which rows are evaluated on the way, which corpus view the final evaluation indexes); this
module never branches on an experiment's or a row's name. Every finished phase leaves a
record in `<run>/phases/`, so a killed run restarted with the same command resumes at the
phase where it stopped; summaries and corpus embeddings are cached by content, so nothing
finished is computed twice.

On N ranks (torchrun) every rank runs this same loop: GRPO and adaptation train data-parallel,
the corpus summaries are generated in per-rank shards, rank 0 alone evaluates (the others receive
its rows) and writes the run folder, and rank 0's phase records and stop decision are broadcast,
so every rank resumes, and leaves the loop, together.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from resume.data import RetrievalData
from resume.loop.config import VIEWS, LoopConfig
from resume.loop.records import PhaseRecords
from resume.utils import distributed
from resume.utils.memory import PeakRSS, release_memory

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
        config: LoopConfig | None = None,
        summarizer: Callable[[], Any] | None = None,
        summarize: Callable[[Any, str], tuple[dict[str, str], dict[str, Any]]] | None = None,
        grpo: Callable[..., dict[str, Any]] | None = None,
        adapt: Callable[..., dict[str, Any]] | None = None,
        log_metrics: Callable[[Mapping[str, float], int | None], None] | None = None,
    ) -> None:
        """`summarizer` builds the summarizer lazily (the baseline never loads an LLM); `summarize`,
        `grpo` and `adapt` are the phases, each None when the experiment does not use it."""
        if corpus_view not in VIEWS:
            raise ValueError(f"corpus_view={corpus_view!r} must be one of {VIEWS}")
        self.config = config or LoopConfig()
        needs_summaries = corpus_view == "summaries" or (
            self.config.max_iterations > 0 and (grpo is not None or self.config.adapt_view == "summaries")
        )
        if needs_summaries and (summarizer is None or summarize is None):
            raise ValueError("this experiment needs summaries: set a summarizer (summarizer=smollm2, ...)")
        if self.config.max_iterations > 0 and grpo is None and adapt is None:
            raise ValueError(
                "loop.max_iterations > 0 but neither grpo nor adaptation is configured: nothing to iterate"
            )
        self.data = data
        self.retriever = retriever
        self.evaluator = evaluator
        self.out_dir = Path(out_dir)
        self.cache_dir = Path(cache_dir)
        self.eval_splits = [s for s in dict.fromkeys(eval_splits) if s in data.splits]
        for point in self.config.eval_points:
            missing = [s for s in point.splits if s not in data.splits]
            if missing:
                raise ValueError(
                    f"loop.eval_points row {point.row!r} names split(s) {missing}, which dataset "
                    f"{data.name!r} lacks (have {sorted(data.splits)}); fix its `splits`"
                )
            if point.view == "summaries" and (summarizer is None or summarize is None):
                raise ValueError(f"loop.eval_points row {point.row!r} indexes summaries: set a summarizer")
        metric = self.config.stop_metric
        known = getattr(evaluator, "metrics", None)
        if metric is not None and known is not None and metric not in known:
            raise ValueError(
                f"loop.stop_on={self.config.stop_on!r}: {metric!r} is not one of eval.metrics {list(known)}"
            )
        self.row_name = row_name
        self.corpus_view = corpus_view
        self._build_summarizer = summarizer
        self._summarizer: Any = None
        self.summarize_fn = summarize
        self.grpo_fn = grpo
        self.adapt_fn = adapt
        self.log_metrics = log_metrics or (lambda metrics, step: None)
        self.records = PhaseRecords(self.out_dir / "phases")
        self.phase_seconds: dict[str, float] = {}
        self.phase_memory: dict[str, dict[str, float]] = {}  # key -> start/peak/end resident MB
        self.summary_stats: dict[str, Any] = {}
        self._summaries: dict[str, dict[str, str]] = {}  # label -> texts, made once per run

    # ------------------------------------------------------------------ pieces
    @property
    def summarizer_built(self) -> bool:
        return self._summarizer is not None

    @property
    def summarizer(self) -> Any:
        if self._summarizer is None:
            assert self._build_summarizer is not None
            self._summarizer = self._build_summarizer()
            built = self._summarizer
            log.info("summarizer %s generates with %s", built.name, built.backend_info())
        return self._summarizer

    def documents(self) -> dict[str, str]:
        return self.data.full_texts()

    def _texts(self, view: str, iteration: int) -> dict[str, str]:
        """What `view` indexes after `iteration`: the documents, their leads or that iteration's summaries."""
        if view == "summaries":
            return self.summaries(f"iter{iteration}")
        return self.data.lead_texts(self.config.lead_words) if view == "lead" else self.documents()

    def summaries(self, label: str) -> dict[str, str]:
        """Summaries of the whole corpus by the current summarizer (cached by weights and settings)."""
        assert self.summarize_fn is not None
        if label in self._summaries:  # the final evaluation reuses the last iteration's summaries
            return self._summaries[label]
        with self._measured(f"summarize/{label}"):
            texts, stats = self.summarize_fn(self.summarizer, label)
        self._summaries[label] = texts
        self.summary_stats[label] = stats
        self.log_metrics(
            {f"summaries/{label}/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}, None
        )
        return texts

    def evaluate_row(
        self, row: str, texts: Mapping[str, str], view: str, splits: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        rows = []
        with self._measured(f"evaluate/{row}"):
            if distributed.is_main():  # once, on rank 0; the other ranks receive its rows
                for split in splits if splits is not None else self.eval_splits:
                    res = self.evaluator(
                        self.retriever, self.data, split, texts, f"{row}-{view}", self.out_dir, self.cache_dir
                    )
                    res.update(row=row, view=view)
                    self.log_metrics({f"eval/{split}/{k}": v for k, v in res["metrics"].items()}, None)
                    rows.append(res)
            rows = distributed.broadcast(rows)
        return rows

    @contextlib.contextmanager
    def _measured(self, key: str) -> Iterator[None]:
        """Add the block's seconds to `phase_seconds[key]` and its resident memory (start, peak,
        end; the peak is the largest over repeats of the key) to `phase_memory[key]`."""
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            yield
            released = release_memory()  # what the block freed goes back to the system before the next
        self.phase_seconds[key] = round(self.phase_seconds.get(key, 0.0) + time.perf_counter() - t0, 2)
        rec, old = mem.record(), self.phase_memory.get(key)
        if old is not None:
            rec = {**rec, "start_mb": old["start_mb"], "peak_mb": max(old["peak_mb"], rec["peak_mb"])}
            if "peak_anon_mb" in old and "peak_anon_mb" in rec:
                rec["peak_anon_mb"] = max(old["peak_anon_mb"], rec["peak_anon_mb"])
        self.phase_memory[key] = rec
        log.info(
            "%s: %.1f s, resident memory peak %.0f MB, %.0f MB at the end (%.0f MB released)",
            key,
            self.phase_seconds[key],
            rec["peak_mb"],
            rec["end_mb"],
            released,
        )

    def _phase(
        self, name: str, fn: Callable[[], dict[str, Any]], restore: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any]:
        """Run a phase once: if its record exists, restore its outputs instead of recomputing."""
        done = distributed.broadcast(self.records.get(name))  # rank 0's record decides for every rank
        if done is not None:
            log.info(
                "phase %s already finished (record %s): restoring its outputs", name, self.records.folder
            )
            restore(done)
            return done
        # Each phase starts from RNG states derived from (seed, phase name), not from whatever
        # earlier phases consumed: a run resumed at this phase computes what an uninterrupted one would.
        pl.seed_everything(self.config.seed + zlib.crc32(name.encode()) % 100_000, verbose=False)
        t0 = time.perf_counter()
        with self._measured(name):
            record = fn()
        record["seconds"] = round(time.perf_counter() - t0, 2)
        record["memory_mb"] = self.phase_memory[name]
        if distributed.world_size() > 1:  # what each rank did: its time and memory
            mine = {
                "rank": distributed.rank(),
                "seconds": record["seconds"],
                "memory_mb": record["memory_mb"],
            }
            record["ranks"] = distributed.all_gather(mine)
        if distributed.is_main():
            self.records.put(name, record)
        return record

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        cfg = self.config
        rows: list[dict[str, Any]] = self._points(0, "summarized")
        iterations: list[dict[str, Any]] = []
        previous: float | None = None
        for t in range(1, cfg.max_iterations + 1):
            it: dict[str, Any] = {"iteration": t}
            if self.grpo_fn is not None:
                folder = self.out_dir / f"iter{t}" / "summarizer"
                it["grpo"] = self._phase(
                    f"iter{t}-grpo",
                    lambda t=t, folder=folder: {
                        **self.grpo_fn(self.summarizer, self.retriever, t, folder),
                        "summarizer": str(folder),
                    },
                    lambda rec: self.summarizer.load_weights(rec["summarizer"]),
                )
            if self.grpo_fn is not None:  # S_t, made as soon as theta_t exists (and cached)
                self.summaries(f"iter{t}")
            rows += self._points(t, "summarized")
            if self.adapt_fn is not None:
                folder = self.out_dir / f"iter{t}" / "retriever"
                it["adapt"] = self._phase(
                    f"iter{t}-adapt",
                    lambda t=t, folder=folder: {
                        **self.adapt_fn(self.retriever, self._texts(cfg.adapt_view, t), t, folder),
                        "retriever": str(folder),
                        "view": cfg.adapt_view,
                    },
                    lambda rec: self.retriever.load_weights(rec["retriever"]),
                )
            rows += self._points(t, "adapted")
            select, selected = cfg.select_split, {}
            if select is not None and select in self.data.splits:
                texts = self._texts(self.corpus_view, t)
                selected = it[select] = self.evaluate_row(f"iter{t}", texts, self.corpus_view, [select])[0][
                    "metrics"
                ]
            it["summaries"] = self.summary_stats.get(f"iter{t}", {})
            iterations.append(it)
            self.log_metrics(
                {"loop/iteration": t, **{f"loop/{select}/{k}": v for k, v in selected.items()}}, t
            )
            watched = self._watched(it)
            stop = (
                watched is not None
                and previous is not None
                and t >= cfg.min_iterations
                and watched - previous < cfg.epsilon
            )
            if distributed.broadcast(stop):  # every rank leaves the loop together
                log.info(
                    "stopping after iteration %d: %s improved by %.4f < epsilon %.4f",
                    t,
                    cfg.stop_on,
                    watched - previous,
                    cfg.epsilon,
                )
                it["stopped"] = True
                break
            previous = watched if watched is not None else previous
        final_texts = self._texts(self.corpus_view, len(iterations))
        rows += self.evaluate_row(self.row_name, final_texts, self.corpus_view)
        outcome = {
            "rows": rows,
            "iterations": iterations,
            "summaries": self.summary_stats,
            "seconds": self.phase_seconds,
            "memory_mb": self.phase_memory,
            "world_size": distributed.world_size(),
        }
        unreached = [p.row for p in cfg.eval_points if p.iteration > len(iterations)]
        if unreached:  # said in the results, never silently dropped
            log.warning(
                "eval points %s were not reached: the loop ran %d iterations", unreached, len(iterations)
            )
            outcome["unreached_eval_points"] = unreached
        return outcome

    def _points(self, iteration: int, stage: str) -> list[dict[str, Any]]:
        """The configured rows evaluated at this moment of the loop (in config order)."""
        rows: list[dict[str, Any]] = []
        for point in self.config.eval_points:
            if point.iteration != iteration or point.stage != stage:
                continue
            texts = self._texts(point.view, iteration)
            rows += self.evaluate_row(point.row, texts, point.view, list(point.splits) or None)
        return rows

    def _watched(self, it: Mapping[str, Any]) -> float | None:
        metric = self.config.stop_metric
        if metric is None:
            return it.get("grpo", {}).get("reward_mean")
        return it.get(self.config.select_split, {}).get(metric)
