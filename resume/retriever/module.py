"""The dense retriever: an HF encoder, a pooling rule and cosine similarity, as a LightningModule."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from resume.assets import resolve_model
from resume.retriever.loss import info_nce
from resume.utils.hashing import fingerprint_state
from resume.utils.io import atomic_save_pretrained, load_pretrained_into

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "last"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Reduce token states [B, T, H] to one vector per text [B, H]."""
    if pooling == "mean":  # Contriever, sentence-transformers MiniLM
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":  # right padding: the last non-pad token
        idx = attention_mask.sum(1) - 1
        return hidden[torch.arange(hidden.size(0), device=hidden.device), idx]
    raise ValueError(f"retriever.pooling={pooling!r} is not one of 'mean', 'cls', 'last'")


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision in ("bf16", "auto"):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    raise ValueError(f"retriever.precision={precision!r} must be one of auto, fp32, bf16, fp16")


class DenseRetriever(pl.LightningModule):
    """Bi-encoder: S(q, x) = cos(pool(enc(q)), pool(enc(x))).

    Receives a built encoder and tokenizer. Encoding is batched, length-sorted (less
    padding), runs under inference mode and returns L2-normalised float32 CPU tensors.

    Training (retriever adaptation, `resume.retriever.adapt.adapt_retriever`): `training_step`
    takes a batch `{"query": {input_ids, attention_mask}, "doc": {...}}` whose doc rows
    `0..B-1` are the positives of the `B` queries (rows `B..` extra negatives) and minimises
    `info_nce` at `temperature`; `configure_optimizers` calls `optimizer_factory` (e.g.
    `functools.partial(torch.optim.AdamW, lr=1e-5)`) with two parameter groups, 1-D tensors
    (biases, LayerNorm) without weight decay, plus a linear warmup over the first
    `warmup_ratio` of the steps when `warmup_ratio > 0`.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        tokenizer: Any,
        pooling: Pooling = "mean",
        query_max_length: int = 64,
        doc_max_length: int = 512,
        batch_size: int = 64,
        query_prefix: str = "",
        doc_prefix: str = "",
        precision: str = "auto",
        name: str = "",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        temperature: float = 0.05,
    ) -> None:
        super().__init__()
        pool(torch.zeros(1, 1, 1), torch.ones(1, 1), pooling)  # validate the pooling name early
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.query_max_length = query_max_length
        self.doc_max_length = doc_max_length
        self.batch_size = batch_size
        self.query_prefix = query_prefix
        self.doc_prefix = doc_prefix
        self.precision_mode = precision
        self.name = name
        self.optimizer_factory = optimizer
        self.temperature = temperature
        self.warmup_ratio = 0.0  # fraction of the fit's steps with linear lr warmup (set per fit by adapt_retriever)
        self.gather_negatives = False  # score the other devices' documents too (set per fit by adapt_retriever)
        # The HF pooler head (BertModel.pooler: dense + tanh on [CLS]) is never read by `pool`; frozen, it
        # gets no optimizer state and DDP does not wait for gradients it will never receive.
        if isinstance(getattr(encoder, "pooler", None), torch.nn.Module):
            encoder.pooler.requires_grad_(False)

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        q = self(batch["query"]["input_ids"], batch["query"]["attention_mask"])
        d = self(batch["doc"]["input_ids"], batch["doc"]["attention_mask"])
        offset = 0
        if self.gather_negatives and self.trainer.world_size > 1:
            d, offset = gather_rows(d)
        loss, stats = info_nce(q, d, self.temperature, positive_offset=offset, prefix="retriever/train/")
        stats["retriever/train/lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        stats["retriever/train/negatives"] = float(d.size(0) - 1)  # per query: in-batch + extra
        self.log_dict(stats, batch_size=q.size(0), on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError(
                "DenseRetriever has no optimizer factory; train it through resume.retriever.adapt.adapt_retriever "
                "(which supplies AdamW from adaptation.lr) or set retriever.optimizer "
                "({_target_: torch.optim.AdamW, _partial_: true, lr: 1e-5})"
            )
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in params if p.ndim >= 2]},
            {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},  # biases, LayerNorm: no decay
        ]
        optimizer = self.optimizer_factory([g for g in groups if g["params"]])
        if self.warmup_ratio <= 0:
            return optimizer
        warmup = max(1, math.ceil(self.warmup_ratio * self.trainer.estimated_stepping_batches))
        # linear warmup then constant: the paper names only AdamW and its lr, no schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- encoding
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(pool(out.last_hidden_state, attention_mask, self.pooling).float(), dim=-1)

    def tokenize(self, texts: list[str], kind: Literal["query", "doc"]) -> Mapping[str, torch.Tensor]:
        prefix, max_len = (
            (self.query_prefix, self.query_max_length) if kind == "query" else (self.doc_prefix, self.doc_max_length)
        )
        return self.tokenizer(
            [prefix + t for t in texts], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )

    @torch.inference_mode()
    def encode(
        self,
        texts: list[str],
        kind: Literal["query", "doc"],
        batch_size: int | None = None,
        progress: bool = False,
        desc: str | None = None,
    ) -> torch.Tensor:
        """Embeddings [len(texts), H], L2-normalised float32 on CPU, in the input order."""
        if not texts:
            return torch.zeros(0, self.dim)
        was_training = self.training
        self.eval()
        bs = batch_size or self.batch_size
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # long first: OOM shows at once
        out = torch.empty(len(texts), self.dim)
        dtype = _autocast_dtype(self.precision_mode, self.device)
        bar = tqdm(total=len(texts), desc=desc or f"encode {kind}s", unit=kind, disable=not progress, leave=False)
        for start in range(0, len(texts), bs):
            idx = order[start : start + bs]
            batch = self.tokenize([texts[i] for i in idx], kind)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                emb = self(batch["input_ids"], batch["attention_mask"])
            out[idx] = emb.float().cpu()
            bar.update(len(idx))
        bar.close()
        self.train(was_training)
        return out

    def encode_queries(self, texts: list[str], **kw: Any) -> torch.Tensor:
        return self.encode(texts, "query", **kw)

    def encode_documents(self, texts: list[str], **kw: Any) -> torch.Tensor:
        return self.encode(texts, "doc", **kw)

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def fingerprint(self) -> str:
        """Identifies weights + encoding settings (keys caches of corpus embeddings)."""
        return fingerprint_state(
            self.encoder,
            extra=[self.pooling, self.query_max_length, self.doc_max_length, self.query_prefix, self.doc_prefix],
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pooling": self.pooling,
            "query_max_length": self.query_max_length,
            "doc_max_length": self.doc_max_length,
            "parameters": sum(p.numel() for p in self.encoder.parameters()),
        }

    # ----------------------------------------------------------------- checkpoints
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write encoder, tokenizer and `retriever.json` (settings, fingerprint) to `folder`.

        The folder is an ordinary HF model folder, so `retriever.model=<folder>` rebuilds this
        retriever. It appears complete or not at all (written beside it, then renamed).
        """
        meta = {**self.describe(), "fingerprint": self.fingerprint()}
        return atomic_save_pretrained(folder, self.encoder, self.tokenizer, "retriever.json", meta)

    def load_weights(self, folder: str | Path) -> None:
        """Load the encoder weights of a `save_pretrained` folder in place (device, dtype, frozen flags kept).

        The tokenizer and encoding settings stay this module's; a folder saved under other
        settings loads with a warning.
        """
        from transformers import AutoModel

        folder = Path(folder)
        load_pretrained_into(self.encoder, folder, AutoModel, "retriever")
        meta = folder / "retriever.json"
        if meta.is_file():
            saved = json.loads(meta.read_text(encoding="utf-8"))
            mine = self.describe()
            keys = ("pooling", "query_max_length", "doc_max_length")
            if any(saved.get(k) != mine[k] for k in keys):
                log.warning("%s was saved with other encoding settings than %s; this module keeps its own",
                            folder, {k: mine[k] for k in keys})


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of `x` from every rank, concatenated in rank order, with gradients flowing back to each
    rank's own rows; and where this rank's rows start. Ranks may hold different row counts."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([x.size(0)], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    width = max(sizes)
    padded = torch.cat([x, x.new_zeros(width - x.size(0), x.size(1))]) if width > x.size(0) else x
    parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def build_retriever(
    model: str | None = None,
    pooling: Pooling = "mean",
    config: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    device: str = "auto",
    **kwargs: Any,
) -> DenseRetriever:
    """Build from a hub name or local folder (`model`), or random-initialised from an HF `config` dict.

    `tokenizer` defaults to `model`; with `config` and no tokenizer, a tiny WordPiece tokenizer
    is built offline (tests).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if (model is None) == (config is None):
        raise ValueError("set exactly one of retriever.model (name or folder) and retriever.config (random init)")
    if model is not None:
        path = resolve_model(model)
        log.info("retriever: loading %s from %s", model, path)
        encoder = AutoModel.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer) if tokenizer else path)
        name = model
    else:
        if tokenizer is not None:
            tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer))
        else:
            from resume.utils.tiny import wordpiece_tokenizer

            tok = wordpiece_tokenizer(tempfile.mkdtemp(prefix="resume-tok-"))
        cfg = dict(config)
        model_type = cfg.pop("model_type", "bert")
        hf_cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), **cfg)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            encoder = AutoModel.from_config(hf_cfg)
        name = f"random-{model_type}"
    retriever = DenseRetriever(encoder, tok, pooling=pooling, name=kwargs.pop("name", None) or name, **kwargs)
    return retriever.to(resolve_device(device))


def resolve_device(device: str) -> torch.device:
    """`auto` -> the first CUDA GPU when one is visible, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
