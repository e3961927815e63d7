"""The method on several processes (CPU, gloo): torchrun of the whole loop and GRPO under DDP equal one
process at the same global batch; rank 0 alone writes the run folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from resume.data.toy import write_toy
from resume.summarizer.generate import GenerationParams
from resume.utils import distributed
from resume.utils.config import REPO_ROOT, torchrun_value
from resume.utils.io import atomic_write_text

HELPERS = Path(__file__).parent / "helpers"
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "RESUME_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }


def _run(cmd: list[str], tmp_path: Path, timeout: int = 420) -> None:
    proc = subprocess.run(
        cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _torchrun(n: int) -> list[str]:
    return [TORCHRUN, "--standalone", "--nproc-per-node", str(n)]  # standalone: a free port


# ---------------------------------------------------------------------- GRPO under DDP
def test_grpo_ddp_two_ranks_equal_one_process_and_a_broken_all_reduce_does_not(tmp_path: Path):
    """4 prompts per step on one process == 2 per rank on two (rollouts seeded per prompt, 2 micro-batches
    per rank); with every backward under no_sync (no all-reduce) the ranks drift apart."""
    data = write_toy(tmp_path / "toy", seed=0)
    cache = tmp_path / "cache"
    helper = [str(HELPERS / "ddp_grpo.py"), str(data), str(cache)]
    _run([sys.executable, *helper, str(tmp_path / "one")], tmp_path)
    _run([*_torchrun(2), *helper, str(tmp_path / "two")], tmp_path)
    _run([*_torchrun(2), *helper, str(tmp_path / "broken"), "broken"], tmp_path)

    def ranks(name: str) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((tmp_path / name).glob("rank*.json"))]

    one, two, broken = ranks("one"), ranks("two"), ranks("broken")
    assert [r["world"] for r in two] == [2, 2] and one[0]["world"] == 1
    # each rank generated its own half of every step's documents; together exactly the single process's
    r0, r1 = two[0]["docs"], two[1]["docs"]
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 8
    merged = [d for step in range(4) for d in r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2]]
    assert merged == one[0]["docs"]
    assert two[0]["weights"] == two[1]["weights"]  # the replicas agree bit for bit

    w_one = torch.load(tmp_path / "one" / "weights.pt")
    w_two = torch.load(tmp_path / "two" / "weights.pt")
    w_broken = torch.load(tmp_path / "broken" / "weights.pt")
    start = instantiate(_tiny_summarizer()).model.state_dict()
    moved = max((w_one[n] - start[n]).abs().max().item() for n in w_one)
    assert moved > 1e-2, moved  # GRPO trained (lr 1e-2, 4 steps)
    diff = max((w_one[n] - w_two[n]).abs().max().item() for n in w_one)
    assert diff < 1e-5, diff  # measured 2.4e-7: summation order only
    assert broken[0]["weights"] != broken[1]["weights"]
    assert max((w_one[n] - w_broken[n]).abs().max().item() for n in w_one) > 1e-3


def _tiny_summarizer():
    from resume.utils.config import compose_node

    return compose_node("summarizer", ["summarizer=tiny"])


# ---------------------------------------------------------------------- the whole loop
NO_DROPOUT = [  # dropout masks are per rank: off, the 2-rank adaptation is the 1-process one
    "+retriever.config.hidden_dropout_prob=0.0",
    "+retriever.config.attention_probs_dropout_prob=0.0",
]


def test_torchrun_whole_loop_equals_one_process_writes_each_file_once_and_resumes(tmp_path: Path):
    """`torchrun --nproc-per-node 2 -m resume.train debug=smoke trainer=ddp` runs Algorithm 1 end to end
    with the rows, summarizer and retriever of the single-process run at the same global batch; the run
    folder holds the same files (plus rank 1's own log), each written by rank 0. (The tiny random
    summarizer never writes the separator, so its smoke GRPO rewards are constant and its weights do not
    move: GRPO's own equality under DDP is the test above; the retriever's adaptation does move.)"""
    common = ["debug=smoke", "grpo.config.seed_per_prompt=true", *NO_DROPOUT, "logger=csv"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run([sys.executable, "-m", "resume.train", *common, f"hydra.run.dir={single}"], tmp_path)
    _run([*_torchrun(2), "-m", "resume.train", *common, "trainer=ddp", f"hydra.run.dir={multi}"], tmp_path)

    a = json.loads((single / "results.json").read_text())
    b = json.loads((multi / "results.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert [(r["row"], r["split"]) for r in a["rows"]] == [(r["row"], r["split"]) for r in b["rows"]]
    for ra, rb in zip(a["rows"], b["rows"]):
        for m, v in ra["metrics"].items():
            assert rb["metrics"][m] == pytest.approx(v, abs=1e-6), (ra["row"], ra["split"], m)
    assert [it.get("stopped") for it in a["iterations"]] == [it.get("stopped") for it in b["iterations"]]

    from safetensors.torch import load_file

    for t in (1, 2):
        for part, tol in (("summarizer", 1e-5), ("retriever", 1e-5)):
            wa = load_file(next((single / f"iter{t}" / part).glob("*.safetensors")))
            wb = load_file(next((multi / f"iter{t}" / part).glob("*.safetensors")))
            worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
            assert worst < tol, (t, part, worst)

    record = json.loads((multi / "phases" / "iter1-grpo.json").read_text())
    assert [r["rank"] for r in record["ranks"]] == [0, 1]  # what each rank did, per phase
    shards = b["summaries"]["iter1"]["shards"]
    assert [s["rank"] for s in shards] == [0, 1] and sum(s["n_docs"] for s in shards) == 32

    files_a = {p.relative_to(single) for p in single.rglob("*") if p.is_file()}
    files_b = {p.relative_to(multi) for p in multi.rglob("*") if p.is_file()}
    assert files_b - files_a == {Path("train.rank1.log")}, files_b ^ files_a
    assert files_a - files_b == set()

    # Killed after iteration 1 (what a kill leaves: iteration 1's phase records and models, nothing
    # later): the same command resumes from the records on every rank and ends where the full run did.
    iter1 = {name: (multi / "phases" / name).read_text() for name in ("iter1-grpo.json", "iter1-adapt.json")}
    for name in ("iter2-grpo.json", "iter2-adapt.json"):
        (multi / "phases" / name).unlink()
    shutil.rmtree(multi / "iter2")
    for name in ("results.json", "results.md"):
        (multi / name).unlink()
    _run([*_torchrun(2), "-m", "resume.train", *common, "trainer=ddp", f"hydra.run.dir={multi}"], tmp_path)
    c = json.loads((multi / "results.json").read_text())
    assert [(r["row"], r["split"], r["metrics"]) for r in c["rows"]] == [
        (r["row"], r["split"], r["metrics"]) for r in b["rows"]
    ]
    assert {name: (multi / "phases" / name).read_text() for name in iter1} == iter1  # restored, not rerun
    assert (multi / "phases" / "iter2-grpo.json").exists() and (multi / "iter2" / "summarizer").is_dir()


# ---------------------------------------------------------------------- pieces
def test_rank_zero_guard_refuses_another_ranks_write_in_the_run_folder(tmp_path: Path, monkeypatch):
    run, cache = tmp_path / "run", tmp_path / "cache"
    try:
        distributed.only_rank_zero_writes(run)
        atomic_write_text(run / "a.txt", "rank 0 may")
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(RuntimeError, match=r"rank 1 tried to write .*b\.txt"):
            atomic_write_text(run / "sub" / "b.txt", "rank 1 may not")
        atomic_write_text(cache / "shard.txt", "outside the run folder: its own files")
    finally:
        distributed.teardown()
    assert not (run / "sub" / "b.txt").exists() and (cache / "shard.txt").exists()


def test_shard_is_contiguous_and_refuses_uneven_splits():
    items = list(range(8))
    parts = [distributed.shard(items, r, 4) for r in range(4)]
    assert parts == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="evenly"):
        distributed.shard(items, 0, 3)
    assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.all_gather(3) == [3]


def test_torchrun_values_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "9")
    assert [torchrun_value(k) for k in ("world_size", "local_world_size", "num_nodes", "rank")] == [
        16,
        8,
        2,
        9,
    ]
    with pytest.raises(ValueError, match="one of"):
        torchrun_value("gpus")


def test_seed_per_prompt_samples_do_not_depend_on_the_other_prompts(compose_in_tmp):
    cfg = compose_in_tmp(["summarizer=tiny"])
    summarizer = instantiate(cfg.summarizer)
    docs = [("a title", "first document about cells"), ("b", "second document about proteins and genes")]
    params = GenerationParams(do_sample=True, max_new_tokens=6, num_return_sequences=2, seed=3)
    per_prompt = GenerationParams(**{**params.describe(), "seed_per_prompt": True})
    both = summarizer.summarize(docs, per_prompt)
    alone = summarizer.summarize(docs[1:], per_prompt)
    assert [c.token_ids for c in both[2:]] == [c.token_ids for c in alone]
    assert per_prompt.key() != params.key()  # a cache never mixes the two


@pytest.mark.parametrize("preset", ["single", "ddp", "fsdp", "deepspeed_zero3"])
def test_trainer_presets_compose(compose_in_tmp, monkeypatch, preset):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = compose_in_tmp([f"trainer={preset}"])
    g, a = cfg.grpo.trainer_kwargs, cfg.adaptation.trainer_kwargs
    assert cfg.trainer_name == preset
    if preset == "single":
        assert g.devices == a.devices == 1
        return
    assert (g.devices, g.num_nodes, a.devices, a.num_nodes) == (2, 2, 2, 2)
    assert cfg.adaptation.batch_size_per == "world" and a.strategy == "ddp"
    strategy = g.strategy if preset == "ddp" else g.strategy._target_
    assert strategy == {"ddp": "ddp", "fsdp": "pytorch_lightning.strategies.FSDPStrategy"}.get(
        preset, "pytorch_lightning.strategies.DeepSpeedStrategy"
    )
