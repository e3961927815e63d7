"""StreamingCheckpointIO: checkpoints streamed to their file, never serialized into memory first."""

from __future__ import annotations

import pytest
import torch
from lightning_fabric.utilities import cloud_io
from pytorch_lightning.plugins.io import TorchCheckpointIO

from resume.utils.lightning import StreamingCheckpointIO, make_trainer


def _trainer(tmp_path, **kwargs):
    return make_trainer(
        kwargs,
        defaults={"logger": False, "enable_progress_bar": False, "accelerator": "cpu", "devices": 1},
        owned={"default_root_dir": str(tmp_path)},
        owner="this test",
        fix="-",
    )


def test_trainers_write_checkpoints_with_the_streaming_writer_unless_given_plugins(tmp_path):
    assert type(_trainer(tmp_path).strategy.checkpoint_io) is StreamingCheckpointIO
    mine = TorchCheckpointIO()
    assert _trainer(tmp_path, plugins=[mine]).strategy.checkpoint_io is mine


def test_a_local_checkpoint_is_written_without_an_in_memory_copy_and_loads_back(tmp_path, monkeypatch):
    def buffered(*args, **kwargs):
        raise AssertionError("Lightning's buffered writer was used")

    monkeypatch.setattr(cloud_io, "_atomic_save", buffered)
    monkeypatch.setattr("lightning_fabric.plugins.io.torch_io._atomic_save", buffered)
    state = {"w": torch.randn(64, 8), "step": 3, "nested": {"m": torch.arange(5)}}
    path = tmp_path / "sub" / "last.ckpt"
    StreamingCheckpointIO().save_checkpoint(state, path)
    back = torch.load(path, weights_only=False)
    assert back["step"] == 3 and torch.equal(back["w"], state["w"])
    assert torch.equal(back["nested"]["m"], state["nested"]["m"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no partial file left


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    path = tmp_path / "last.ckpt"
    StreamingCheckpointIO().save_checkpoint({"step": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 -- whatever pickling raises
        StreamingCheckpointIO().save_checkpoint({"step": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
