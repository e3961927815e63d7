"""A run killed mid-phase resumes where it stopped and ends with the metrics of an uninterrupted run;
a multirun sweep survives a failing job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import compose_cfg

from resume.train import run
from resume.utils.config import REPO_ROOT

# one iteration, two GRPO steps, no validation: the smallest run with every phase in it
OVERRIDES = [
    "debug=smoke",
    "logger=none",
    "budget.max_iterations=1",
    "grpo.config.steps=2",
    "grpo.config.val_every=0",
    "data.generator.docs_per_topic=5",
]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "resume.train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _final_rows(results: dict) -> dict[tuple[str, str], dict[str, float]]:
    return {(r["row"], r["split"]): r["metrics"] for r in results["rows"]}


# ~1-2 min on 2 cores: the only test that runs a whole iterative run three times
def test_killed_run_resumes_with_same_metrics(tmp_path):
    killed = tmp_path / "killed"
    cmd = _cli([*OVERRIDES, f"hydra.run.dir={killed / 'out'}", f"paths.cache_dir={killed / 'cache'}"])
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = killed / "out" / "phases" / "iter1-grpo.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child never finished its first GRPO phase"
    proc.send_signal(signal.SIGKILL)  # somewhere in iteration 1's summarizing or adaptation
    proc.wait()
    assert not (killed / "out" / "results.json").exists()
    done_before = sorted(p.name for p in (killed / "out" / "phases").glob("*.json"))

    resumed = run(compose_cfg(OVERRIDES, killed))
    reference = run(compose_cfg(OVERRIDES, tmp_path / "reference"))

    assert "iter1-grpo.json" in done_before
    assert _final_rows(resumed) == _final_rows(reference)
    # the resumed run restored the finished GRPO phase instead of training again
    record = json.loads((killed / "out" / "phases" / "iter1-grpo.json").read_text())
    assert record["seconds"] > 0 and Path(record["summarizer"]).is_dir()


@pytest.mark.parametrize("launcher", ["basic", "local_procs"])
def test_sweep_survives_a_failing_job(tmp_path, launcher):
    """data.max_docs=5 cannot hold the relevant documents: that job fails, the other still runs. Also
    through the submitit launcher (conf/hydra/launcher/local_procs.yaml, the Slurm launcher's code path):
    every job in its own process."""
    if launcher != "basic":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[cluster]'")
    sweep = tmp_path / "sweep"
    cmd = _cli(
        [
            "-m",
            *OVERRIDES,
            f"hydra/launcher={launcher}",
            "experiment=baseline",
            "data.max_docs=5,null",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=job${hydra.job.num}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    out = subprocess.run(
        cmd, check=False, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data.max_docs=5 is smaller" in (sweep / "job0" / "error.txt").read_text()
    assert not (sweep / "job0" / "results.json").exists()
    results = json.loads((sweep / "job1" / "results.json").read_text())
    assert results["rows"][-1]["corpus"]["size"] == 20  # 4 toy topics x 5 documents
