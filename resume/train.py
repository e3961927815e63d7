"""`python -m resume.train`: every experiment, baseline to full method, through one entry point."""

from __future__ import annotations

import json
import logging
import resource
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from resume.data import register_data_resolvers
from resume.loop import Loop, LoopConfig, make_adapt, make_grpo, make_summarize
from resume.summarizer.vllm_engine import release_engines
from resume.utils import distributed
from resume.utils.config import register_resolvers
from resume.utils.devices import environment
from resume.utils.io import atomic_write_json, atomic_write_text
from resume.utils.lightning import build_loggers, close_loggers
from resume.utils.memory import set_mmap_threshold

log = logging.getLogger("resume")

# Before @hydra.main composes: hydra.run.dir and paths.* interpolate these resolvers.
register_resolvers()
register_data_resolvers()


def _check_run_folder(out: Path, resolved: str) -> None:
    """Refuse to mix two different configs in one run folder (nothing computed is overwritten)."""
    prev = out / "config_resolved.yaml"
    # Compared as data, not text: the same settings written in another key order are the same run.
    if prev.exists() and yaml.safe_load(prev.read_text()) != yaml.safe_load(resolved):
        raise RuntimeError(
            f"{out} already holds a run with a different configuration ({prev}); rerun with the same "
            f"overrides to resume it, or add tag=<label> (or hydra.run.dir=...) to start a separate run"
        )


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table of the paper rows this run produced, labelled with its budget."""
    names = results["metric_names"]
    generation = (results.get("summarizer") or {}).get("generation")
    engine = ""
    if generation:
        engine = f"generation: {generation['engine']} {generation.get('dtype', '')}".rstrip()
    # what the GRPO update's forwards ran in, per round (run_grpo's `autocast`)
    updates = sorted(
        {(it.get("grpo") or {}).get("autocast") for it in results.get("iterations", [])} - {None}
    )
    update = ", ".join("fp32" if a == "off" else f"{a} autocast" for a in updates)
    lines = [
        f"budget: {results['budget']}",
        *([engine] if engine else []),
        *([f"GRPO update: {update}"] if update else []),
        "",
        "| row | ablation | split | corpus indexed | queries | " + " | ".join(names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for row in results["rows"]:
        vals = " | ".join(f"{row['metrics'][m]:.4f}" for m in names)
        corpus = f"{row['corpus']['name']}: {row['corpus']['size']} {row['view']}"
        lines.append(
            f"| {row['row']} | {results['ablation']} | {row['split']} | {corpus} | "
            f"{row['num_queries']} | {vals} |"
        )
    return "\n".join(lines)


def build_loop(
    cfg: DictConfig, data: Any, retriever: Any, out: Path, loggers: list[Any], log_metrics: Any
) -> Any:
    """Join the configured pieces into Algorithm 1; phases the experiment switches off stay None."""
    loop_cfg = LoopConfig(
        max_iterations=cfg.loop.max_iterations,
        stop_on=cfg.loop.stop_on,
        epsilon=cfg.loop.epsilon,
        min_iterations=cfg.loop.min_iterations,
        select_split=cfg.loop.select_split,
        eval_points=OmegaConf.to_container(cfg.loop.eval_points, resolve=True),
        adapt_view=cfg.loop.adapt_view,
        lead_words=cfg.loop.lead_words,
        seed=cfg.seed,
    )
    tok = retriever.tokenizer

    def count_tokens(text: str) -> int:  # summary length in RETRIEVER tokens, as the reward counts it
        return len(tok(text, add_special_tokens=False)["input_ids"])

    iterating = loop_cfg.max_iterations > 0
    return Loop(
        data=data,
        retriever=retriever,
        evaluator=instantiate(cfg.eval),
        out_dir=out,
        cache_dir=cfg.paths.cache_dir,
        eval_splits=list(cfg.eval_splits),
        row_name=cfg.experiment_name,
        corpus_view=cfg.corpus_view,
        config=loop_cfg,
        summarizer=lambda: instantiate(cfg.summarizer),
        summarize=make_summarize(data, cfg.paths.cache_dir, out, count_tokens, **cfg.summaries),
        grpo=make_grpo(instantiate(cfg.grpo), instantiate(cfg.reward), data, loggers, log_metrics)
        if iterating and cfg.loop.grpo
        else None,
        adapt=make_adapt(instantiate(cfg.adaptation), data, loggers=loggers)
        if iterating and cfg.loop.adapt
        else None,
        log_metrics=log_metrics,
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build everything the config names, run it, write results.json, close the loggers.

    Under torchrun every rank runs this; rank 0 alone writes the run folder (and logs)."""
    t0 = time.perf_counter()
    distributed.init_from_env(float(cfg.get("distributed", {}).get("timeout_minutes", 60)))
    try:
        return _run(cfg, t0)
    finally:
        # Engines first: an in-process vLLM engine (vLLM 0.32) tears down its own groups *and* the default
        # one on shutdown; left to its exit handler, it found them already destroyed and raised.
        release_engines()
        distributed.teardown()


def _run(cfg: DictConfig, t0: float) -> dict[str, Any]:
    set_mmap_threshold(cfg.get("mmap_threshold_mb"))
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    _check_run_folder(out, resolved)
    distributed.barrier()  # every rank has compared the folder's config before rank 0 rewrites it
    if distributed.is_main():
        atomic_write_text(out / "config_resolved.yaml", resolved)
    distributed.only_rank_zero_writes(out)
    loggers = build_loggers(cfg.get("logger"))
    status = "failed"
    try:
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

        def log_metrics(metrics: dict[str, float], step: int | None) -> None:
            for lg in loggers:
                lg.log_metrics(dict(metrics), step=step)

        log.info("budget: %s", cfg.budget.description)
        data = instantiate(cfg.data)
        log.info("data: %s", json.dumps(data.describe()))
        retriever = instantiate(cfg.retriever)
        loop = build_loop(cfg, data, retriever, out, loggers, log_metrics)
        outcome = loop.run()
        results = {
            "experiment": cfg.experiment_name,
            "ablation": cfg.ablation_name,
            "seed": cfg.seed,
            "budget": cfg.budget.description,
            "metric_names": list(cfg.eval.metrics),
            "data": data.describe(),
            "retriever": retriever.describe(),
            "summarizer": loop.summarizer.describe() if loop.summarizer_built else None,
            **outcome,
            "environment": environment(),
            "wall_time_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        anon = [m["peak_anon_mb"] for m in results.get("memory_mb", {}).values() if "peak_anon_mb" in m]
        if anon:  # the part of the peak that is the run's own memory (not the libraries' file pages)
            results["peak_anon_mb"] = max(anon)
        if distributed.world_size() > 1:
            results["peak_rss_mb_per_rank"] = distributed.all_gather(results["peak_rss_mb"])
        status = "success"
        if not distributed.is_main():
            return results
        atomic_write_json(out / "results.json", results)
        table = results_table(results)
        atomic_write_text(out / "results.md", table + "\n")
        print(table)
        seconds, rss = results["wall_time_s"], results["peak_rss_mb"]
        anon = f", {results['peak_anon_mb']:.0f} MB of it anonymous" if "peak_anon_mb" in results else ""
        print(f"\nrun folder: {out} ({seconds:.0f} s, peak RSS {rss:.0f} MB{anon})")
        return results
    finally:
        close_loggers(loggers, status)


def get_metric_value(results: dict[str, Any], optimized_metric: str) -> float:
    """The sweep objective: `<split>/<metric>` of the run's own (last) row, e.g. `test/ndcg@10`."""
    split, _, metric = optimized_metric.partition("/")
    rows = [r for r in results["rows"] if r["split"] == split and r["row"] == results["experiment"]]
    if not metric or not rows or metric not in rows[-1]["metrics"]:
        have = sorted({f"{r['split']}/{m}" for r in results["rows"] for m in r["metrics"]})
        raise ValueError(
            f"optimized_metric={optimized_metric!r} is not among this run's results {have}; "
            "set optimized_metric=<split>/<metric>"
        )
    return float(rows[-1]["metrics"][metric])


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # One failing job must not stop a sweep: record the error in its folder and go on
        # (its loggers are already closed by run()'s finally).
        try:
            results = run(cfg)
        except Exception:  # noqa: BLE001
            err = traceback.format_exc()
            atomic_write_text(Path(cfg.paths.output_dir) / "error.txt", err)
            log.error(
                "job %s failed; the sweep goes on. Traceback in %s/error.txt\n%s",
                cfg.run_name,
                cfg.paths.output_dir,
                err,
            )
            return None
    else:
        results = run(cfg)
    return (
        get_metric_value(results, cfg.optimized_metric) if cfg.optimized_metric else None
    )  # sweeper objective


if __name__ == "__main__":
    main()
