"""A resumable run folder: each finished stage leaves a small JSON record, so a rerun skips it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunFolder:
    """``root/<stage>/`` holds a stage's outputs and, once the stage has finished, ``root/<stage>/done.json``
    with its results. A stage without ``done.json`` is run again (stages that train resume from their own
    checkpoints inside their folder)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def result(self, stage: str) -> dict[str, Any] | None:
        """The results of a finished stage, or None if it has not finished."""
        path = self.root / stage / "done.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # a record cut short by a crash: the stage is simply run again
            return None

    def finish(self, stage: str, result: dict[str, Any]) -> dict[str, Any]:
        """Records ``result`` as the stage's outcome (written to a temporary name, then renamed)."""
        path = self.stage_dir(stage) / "done.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
        return result
