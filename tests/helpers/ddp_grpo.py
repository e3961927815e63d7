"""GRPO of the tiny summarizer on one process or under torchrun (Lightning DDP, gloo on CPU).

    python tests/helpers/ddp_grpo.py <toy BEIR folder> <cache folder> <out folder> [broken|fsdp|deepspeed]
    torchrun --nproc-per-node 2 tests/helpers/ddp_grpo.py <toy> <cache> <out> [broken|fsdp|deepspeed]

The same global batch either way (`prompts_per_step` 4: 4 documents on one process, 2 per rank on
two), rollouts seeded per prompt, the deterministic word-start reward. Every rank writes
`<out>/rank<r>.json` (the documents it generated for, a checksum of its final weights, the history's
rewards); rank 0 saves the final weights to `<out>/weights.pt`. `broken` runs every backward inside
DDP's `no_sync`, so gradients are never all-reduced: what the equality test must catch. `fsdp` and
`deepspeed` train on the GPUs with those strategies (conf/trainer/fsdp.yaml, deepspeed_zero3.yaml):
rollouts and weight sync then run on gathered parameters.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: grpo_fixtures

from grpo_fixtures import WordStartReward

from resume.data import load_beir, register_data_resolvers
from resume.grpo import GRPOConfig, run_grpo
from resume.grpo.module import GRPOModule
from resume.utils import distributed
from resume.utils.config import compose_node


def strategy_kwargs(mode: str, world: int) -> dict:
    if mode == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        return {"accelerator": "gpu", "devices": world, "strategy": FSDPStrategy(state_dict_type="full")}
    if mode == "deepspeed":
        from pytorch_lightning.strategies import DeepSpeedStrategy

        return {"accelerator": "gpu", "devices": world, "strategy": DeepSpeedStrategy(stage=3)}
    return {"accelerator": "cpu", "devices": world, "strategy": "ddp" if world > 1 else "auto"}


def main(data_dir: str, cache: str, out: str, mode: str) -> None:
    broken = mode == "broken"
    torch.set_num_threads(1)
    os.environ["RESUME_CACHE"] = cache
    register_data_resolvers()
    distributed.init_from_env()
    summarizer = instantiate(compose_node("summarizer", ["summarizer=tiny"]))
    data = load_beir(data_dir, ["train"], name="toy")
    world = distributed.world_size()
    seen: list[str] = []
    original = GRPOModule._generate

    def recording(self, doc_ids, params):  # what this rank generated for: its share of each batch
        result = original(self, doc_ids, params)
        if params.do_sample:
            share = len(doc_ids) // world
            seen.extend(doc_ids[distributed.rank() * share : (distributed.rank() + 1) * share])
        return result

    GRPOModule._generate = recording
    if broken:
        GRPOModule._no_sync = lambda self, skip: self._trainer.model.no_sync()
    config = GRPOConfig(
        steps=4,
        num_generations=2,
        prompts_per_step=4,
        mini_batch_size=2,  # two backward passes per rank per step: accumulation under no_sync
        max_new_tokens=8,
        val_every=0,
        log_completions_every=0,
        checkpoint_every=0,
        seed_per_prompt=True,
        seed=0,
    )
    trainer_kwargs = strategy_kwargs(mode, world)
    stats = run_grpo(
        summarizer,
        WordStartReward(8),
        data.corpus,
        sorted(data.corpus),
        out_dir=Path(out) / "grpo",
        config=config,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0),
        trainer_kwargs=trainer_kwargs,
    )
    params = {n: p.detach().cpu().clone() for n, p in summarizer.model.named_parameters()}
    digest = hashlib.sha256(b"".join(p.numpy().tobytes() for p in params.values())).hexdigest()
    rank = distributed.rank()
    Path(out).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        torch.save(params, Path(out) / "weights.pt")
    (Path(out) / f"rank{rank}.json").write_text(
        json.dumps({"docs": seen, "weights": digest, "steps": stats["steps"], "world": world})
    )
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "ddp")
