"""GPU checks (`pytest -m gpu`): skipped cleanly without CUDA. Run them on the GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resume.train import run

pytestmark = pytest.mark.gpu


def test_smoke_loop_on_gpu_in_bf16(compose_in_tmp, tmp_path):
    """The whole loop on a GPU: bf16 encoding, GRPO in bf16-mixed over fp32 master weights,
    adaptation in bf16-mixed; every phase runs and the models sit on the GPU."""
    cfg = compose_in_tmp(
        [
            "debug=smoke",
            "logger=none",
            "summarizer.dtype=fp32",
            "grpo.trainer_kwargs.precision=bf16-mixed",
            "adaptation.trainer_kwargs.precision=bf16-mixed",
            "grpo.config.steps=2",
            "grpo.config.val_every=0",
        ]
    )
    torch.cuda.reset_peak_memory_stats()
    results = run(cfg)
    assert torch.cuda.max_memory_allocated() > 0  # the models ran on the GPU (device: auto)
    assert [r["row"] for r in results["rows"] if r["split"] == "test"] == [
        "baseline",
        "fixed_summary",
        "non_iterative",
        "iterative",
    ]
    done = sorted(p.stem for p in (tmp_path / "out" / "phases").glob("*.json"))
    assert done == ["iter1-adapt", "iter1-grpo", "iter2-adapt", "iter2-grpo"]


def test_faiss_gpu_search_equals_cpu():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss-cpu installed; the gpu extra brings faiss-gpu")
    from resume.retriever.index import FlatIPIndex

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((5000, 64)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:50] + 0.01 * rng.standard_normal((50, 64)).astype(np.float32)
    ids = [f"d{i}" for i in range(len(docs))]
    cpu = FlatIPIndex(docs, ids, use_gpu=False).search(queries, 100)
    gpu = FlatIPIndex(docs, ids, use_gpu=True).search(queries, 100)
    assert np.array_equal(cpu[1][:, :10], gpu[1][:, :10])
    assert np.allclose(cpu[0], gpu[0], atol=1e-4)


def test_random_qwen3_4b_generates_in_bf16_with_the_prefix_cache():
    """Paper-size architecture (random weights) fits and generates; the shared-prefix path engages."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
    from _models import bench_summarizer

    summarizer = bench_summarizer("qwen3_4b_thinking", 128, random_qwen3_4b=True)
    assert next(summarizer.model.parameters()).dtype == torch.bfloat16
    from resume.summarizer.generate import GenerationParams

    out = summarizer.summarize(
        [("t", "a document about gpus " * 20)] * 4, GenerationParams(max_new_tokens=16)
    )
    assert len(out) == 4 and all(c.num_tokens >= 1 for c in out)
    assert summarizer.backend.last_prefix_length > 0


@pytest.mark.parametrize("mode", ["fsdp", "deepspeed"])
def test_grpo_trains_under_a_sharding_strategy(tmp_path, mode):
    """GRPO of the tiny summarizer under FSDP / DeepSpeed ZeRO-3 on every visible GPU (conf/trainer/fsdp,
    deepspeed_zero3): rollouts and the engine's weight sync run on gathered parameters, the policy
    trains and is exported whole."""
    import importlib.util
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from resume.data.toy import write_toy
    from resume.utils.config import REPO_ROOT

    if mode == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs the deepspeed extra (pip install -e '.[deepspeed]')")
    data = write_toy(tmp_path / "toy", seed=0)
    helper = Path(__file__).parent / "helpers" / "ddp_grpo.py"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    n = min(2, torch.cuda.device_count())
    cmd = [torchrun, "--standalone", "--nproc-per-node", str(n), str(helper), str(data), str(tmp_path / "c")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RESUME_CACHE": str(tmp_path / "c")}
    proc = subprocess.run(
        [*cmd, str(tmp_path / "out"), mode], check=False, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("rank*.json"))]
    assert len(ranks) == n and len({r["weights"] for r in ranks}) == 1 and ranks[0]["steps"] == 4
    assert (tmp_path / "out" / "grpo" / "summarizer" / "config.json").is_file()
