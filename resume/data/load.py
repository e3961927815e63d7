"""The `data=` config entry point: locate (or download) a BEIR dataset, carve splits, subset."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from resume.data.beir import DataError, RetrievalData, Split, available_splits, check_unknown_qrels, load_beir

log = logging.getLogger(__name__)


def _basename(path: str | None) -> str:
    """`${basename:<path>}`: the last component of a path (`/x/my-beir/` -> `my-beir`)."""
    # data=beir passes `${oc.select:data.path,null}`, so an unset data.path (`???`) arrives here as
    # None and gets this message instead of OmegaConf's one about whichever key interpolated it.
    if path is None or not str(path).strip():
        raise DataError(
            "data.path is not set: data=beir needs data.path=<a BEIR folder holding corpus.jsonl, "
            "queries.jsonl and qrels/<split>.tsv>"
        )
    name = Path(os.path.abspath(str(path))).name  # abspath: `.` and `x/..` name the folder they mean
    if not name:
        raise DataError(f"data.path={path!r} has no base name to name the dataset by; set data.name=<name>")
    return name


def register_data_resolvers() -> None:
    """Register the OmegaConf resolvers the `data=` configs use (idempotent): `${basename:<path>}`.

    Not done at import time, so importing this module changes no global state; the config
    entry points call it before composing.
    """
    if not OmegaConf.has_resolver("basename"):
        OmegaConf.register_new_resolver("basename", _basename)


def _download(url: str, download_dir: str | Path, name: str) -> Path:
    """BEIR's own download (users with a network); the folder is reused afterwards."""
    from beir import util as beir_util  # heavy import, only when a download is needed

    target = Path(download_dir) / name
    if target.is_dir():
        return target
    log.info("downloading %s from %s into %s", name, url, download_dir)
    Path(download_dir).mkdir(parents=True, exist_ok=True)
    try:
        return Path(beir_util.download_and_unzip(url, str(download_dir)))
    except Exception as e:  # network errors come in many types
        raise DataError(
            f"could not download dataset {name!r} from {url} ({type(e).__name__}: {e}); "
            f"without a network, point data.path at a local BEIR folder"
        ) from e


def carve_dev(data: RetrievalData, source: str, fraction: float, seed: int, name: str = "dev") -> None:
    """Move a seeded random `fraction` of `source`'s queries into a new split `name` (in place)."""
    if name in data.splits:
        raise DataError(f"dataset {data.name!r} already has a {name!r} split; set data.dev_from_train: null")
    if not 0.0 < fraction < 1.0:
        raise DataError(f"data.dev_from_train.fraction must be in (0, 1), got {fraction}")
    src = data.split(source)
    qids = sorted(src.qrels)
    rng = np.random.default_rng(seed)
    n_dev = max(1, round(fraction * len(qids)))
    dev_ids = set(rng.choice(len(qids), size=n_dev, replace=False).tolist())
    dev = [q for i, q in enumerate(qids) if i in dev_ids]
    keep = [q for i, q in enumerate(qids) if i not in dev_ids]
    data.splits[source] = Split(source, {q: src.queries[q] for q in keep}, {q: src.qrels[q] for q in keep})
    data.splits[name] = Split(name, {q: src.queries[q] for q in dev}, {q: src.qrels[q] for q in dev})
    data.notes.append(f"{name} = {n_dev} queries carved from {source} (fraction {fraction}, seed {seed})")


def subset(
    data: RetrievalData,
    max_docs: int | None,
    max_queries: Mapping[str, int] | None,
    seed: int,
) -> None:
    """Shrink a dataset to a budget (in place), keeping every judged-relevant document of kept queries.

    Queries are sampled per split first; the corpus then keeps all documents relevant to a
    kept query and is filled with seeded random other documents up to `max_docs`.
    """
    rng = np.random.default_rng(seed)
    for split_name, limit in (max_queries or {}).items():
        sp = data.split(split_name)
        if limit is None or len(sp.qrels) <= limit:
            continue
        qids = sorted(sp.qrels)
        keep = sorted(qids[i] for i in rng.choice(len(qids), size=int(limit), replace=False))
        data.splits[split_name] = Split(
            split_name, {q: sp.queries[q] for q in keep}, {q: sp.qrels[q] for q in keep}
        )
        data.notes.append(f"{split_name}: {limit} of {len(qids)} queries sampled (seed {seed})")
    if max_docs is None or len(data.corpus) <= max_docs:
        return
    required = sorted(
        {d for sp in data.splits.values() for docs in sp.qrels.values() for d, g in docs.items() if g > 0}
    )
    if len(required) > max_docs:
        raise DataError(
            f"data.max_docs={max_docs} is smaller than the {len(required)} documents judged relevant to "
            "the kept queries; raise data.max_docs or lower data.max_queries"
        )
    required_set = set(required)
    others = sorted(d for d in data.corpus if d not in required_set)
    fill = rng.choice(len(others), size=max_docs - len(required), replace=False)
    kept = required_set | {others[i] for i in fill}
    n_before = len(data.corpus)
    data.corpus = {d: doc for d, doc in data.corpus.items() if d in kept}  # keep file order
    for name, sp in list(data.splits.items()):
        qrels = {q: {d: g for d, g in docs.items() if d in kept} for q, docs in sp.qrels.items()}
        data.splits[name] = Split(name, sp.queries, qrels)
    data.notes.append(
        f"corpus: {max_docs} of {n_before} documents (all {len(required)} relevant to kept queries + "
        f"seeded random fill, seed {seed})"
    )


def load_dataset(
    name: str,
    path: str | None,
    splits: list[str] | None,
    eval_split: str,
    url: str | None = None,
    download_dir: str | None = None,
    dev_from_train: Mapping[str, float] | None = None,
    max_docs: int | None = None,
    max_queries: Mapping[str, int] | None = None,
    seed: int = 0,
    generator: Mapping | None = None,
    unknown_qrels: str = "error",
) -> RetrievalData:
    """Build the dataset a `data=` config describes.

    Resolution order: `path` if it is a folder; else `generator` (toy data written by code);
    else `url` downloaded into `download_dir` with BEIR's downloader.

    `splits=None` uses every `qrels/*.tsv` of the folder; `eval_split` must then be one of them
    (or `dev` carved by `dev_from_train`), and `max_queries` entries naming splits the folder
    lacks are ignored, since a budget is written without knowing which splits a folder has.
    `unknown_qrels` ("error" | "drop") decides what a qrels row naming an unknown id does.
    """
    check_unknown_qrels(unknown_qrels)  # before any download
    folder: Path | None = Path(path) if path else None
    if folder is None or not folder.is_dir():
        if generator is not None:
            from resume.data.toy import write_toy

            if folder is None:
                raise DataError(f"data.path must be set for the generated dataset {name!r}")
            write_toy(folder, **dict(generator))
        elif url:
            folder = _download(url, download_dir or "data", name)
        else:
            raise DataError(f"data.path={path!r} for dataset {name!r} is not a folder and no data.url is set")
    if splits is None:
        found = available_splits(folder)
        will_have = found + (["dev"] if dev_from_train and "dev" not in found else [])
        # Checked before reading the corpus, which can take minutes on a large folder.
        if found and eval_split not in will_have:
            raise DataError(
                f"{folder}: data.eval_split={eval_split!r} is not among the splits found in its qrels/ "
                f"({found}; data.splits=null uses every qrels/*.tsv); set data.eval_split=<one of them>"
            )
        if max_queries:
            ignored = sorted(s for s in max_queries if s not in will_have)
            if ignored:
                log.info("data.max_queries: %s not in %s (splits %s); ignored", ignored, folder, will_have)
            max_queries = {s: n for s, n in max_queries.items() if s in will_have}
        # None when qrels/ has no .tsv: load_beir then raises its "no qrels file found" error
        data = load_beir(folder, found or None, name=name, unknown_qrels=unknown_qrels)
    else:
        data = load_beir(folder, list(splits), name=name, unknown_qrels=unknown_qrels)
    if dev_from_train:
        carve_dev(data, "train", float(dev_from_train["fraction"]), int(dev_from_train["seed"]))
    subset(data, max_docs, max_queries, seed)
    data.split(eval_split)  # fail early on a missing eval split
    return data
