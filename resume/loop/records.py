"""Phase records: one JSON file per finished phase, so a killed run resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resume.utils.io import atomic_write_json


class PhaseRecords:
    """One JSON file per finished phase; its presence means the phase's outputs are complete."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> dict[str, Any] | None:
        path = self.folder / f"{name}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RuntimeError(f"{path}: corrupt phase record ({e}); delete it to redo that phase") from None

    def put(self, name: str, record: dict[str, Any]) -> None:
        atomic_write_json(self.folder / f"{name}.json", record)
