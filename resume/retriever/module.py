"""The dense retriever: an HF encoder, a pooling rule and cosine similarity, as a LightningModule."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from resume.utils.devices import resolve_device
from resume.utils.hashing import fingerprint_state
from resume.utils.hf import load_or_init
from resume.utils.io import atomic_save_pretrained, load_pretrained_into
from resume.utils.tiny import wordpiece_tokenizer

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

    It does not train itself: retriever adaptation (`resume.retriever.adapt.adapt_retriever`)
    wraps it in `resume.retriever.contrastive.ContrastiveModule` for one fit, as GRPO wraps the
    summarizer; `temperature` is the InfoNCE temperature that adaptation uses for this model.
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
        # InfoNCE temperature of adaptation: tuned with the model, so kept with it
        self.temperature = temperature
        # The HF pooler head (BertModel.pooler: dense + tanh on [CLS]) is never read by `pool`; frozen, it
        # gets no optimizer state and DDP does not wait for gradients it will never receive.
        if isinstance(getattr(encoder, "pooler", None), torch.nn.Module):
            encoder.pooler.requires_grad_(False)

    # ----------------------------------------------------------------- encoding
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(pool(out.last_hidden_state, attention_mask, self.pooling).float(), dim=-1)

    def tokenize(self, texts: list[str], kind: Literal["query", "doc"]) -> Mapping[str, torch.Tensor]:
        prefix, max_len = (
            (self.query_prefix, self.query_max_length)
            if kind == "query"
            else (self.doc_prefix, self.doc_max_length)
        )
        return self.tokenizer(
            [prefix + t for t in texts],
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
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
        bar = tqdm(
            total=len(texts), desc=desc or f"encode {kind}s", unit=kind, disable=not progress, leave=False
        )
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
            extra=[
                self.pooling,
                self.query_max_length,
                self.doc_max_length,
                self.query_prefix,
                self.doc_prefix,
            ],
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
                log.warning(
                    "%s was saved with other encoding settings than %s; this module keeps its own",
                    folder,
                    {k: mine[k] for k in keys},
                )


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
    from transformers import AutoModel

    encoder, tok, name = load_or_init(
        AutoModel,
        model=model,
        config=config,
        tokenizer=tokenizer,
        tiny_tokenizer=lambda: wordpiece_tokenizer(tempfile.mkdtemp(prefix="resume-tok-")),
        seed=seed,
        what="retriever",
        default_type="bert",
    )
    retriever = DenseRetriever(encoder, tok, pooling=pooling, name=kwargs.pop("name", None) or name, **kwargs)
    return retriever.to(resolve_device(device))
