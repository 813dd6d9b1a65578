"""Real data in a documented format: an image folder plus a captions file.

Layout::

    root/
      captions.jsonl          one JSON object per line: {"image": "relative/path.png", "caption": "..."}
      relative/path.png       any format Pillow reads (PNG, JPEG, WebP, ...), any mode (converted to RGB)

Blank lines are skipped. ``captions.json`` (a JSON list of the same objects) is accepted as well. Image
paths are relative to ``root`` and may not leave it. Every entry is validated when the dataset is built,
so a bad line fails at once, with the file name and line number (or list index), not mid-training.

Each item is ``(image, caption)``: ``torch.uint8 [3, S, S]`` (shorter side resized to ``S`` with
bicubic filtering, then centre-cropped) and the caption string. :func:`export_shapes_folder` writes the
shapes world in this format (the tests' fixture, and an example for users).
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import check_int
from .shapes import ShapesWorld, caption, render

CAPTIONS_JSONL = "captions.jsonl"


def _pil() -> ModuleType:
    """Import Pillow (a dependency of the ``cm3leon`` package), with an actionable error if missing."""
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow is a declared dependency
        raise ImportError("reading image folders needs Pillow: pip install pillow") from err
    return Image


def _check_entry(entry: Any, root: Path, where: str) -> tuple[Path, str]:
    """Validate one captions entry; ``where`` ("captions.jsonl:3") prefixes every error."""
    # malformed file content is a ValueError (bad data), not a TypeError (bad argument)
    if not isinstance(entry, dict):
        raise ValueError(  # noqa: TRY004
            f"{where}: expected a JSON object with 'image' and 'caption', got {type(entry).__name__}")
    missing = [k for k in ("image", "caption") if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    image, text = entry["image"], entry["caption"]
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: 'image' must be a non-empty string, got {image!r}")
    if not isinstance(text, str):
        raise ValueError(f"{where}: 'caption' must be a string, got {type(text).__name__}")  # noqa: TRY004
    path = (root / image).resolve()
    if Path(image).is_absolute() or not path.is_relative_to(root.resolve()):
        raise ValueError(f"{where}: image path {image!r} must be relative to the folder and stay inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    return path, text


def read_captions(root: str | PathLike, captions: str = CAPTIONS_JSONL) -> list[tuple[Path, str]]:
    """Parse and validate ``root/captions`` (``.jsonl`` or ``.json``) into ``(image path, caption)`` pairs."""
    root = Path(root)
    file = root / captions
    if not file.is_file():
        raise FileNotFoundError(f"captions file not found: {file}")
    if file.suffix == ".json":
        try:
            entries = json.loads(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}: not UTF-8 text: {err}") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: invalid JSON: {err}") from err
        if not isinstance(entries, list):
            raise ValueError(f"{file}: expected a JSON list of objects")
        items = [_check_entry(e, root, f"{file}[{i}]") for i, e in enumerate(entries)]
    else:
        items = []
        # JSON Lines ends lines with "\n" only: str.splitlines() would also split inside captions holding
        # U+2028 or U+0085, which json.dumps(ensure_ascii=False) writes unescaped.
        for lineno, raw in enumerate(file.read_bytes().split(b"\n"), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{file}:{lineno}: not UTF-8 text: {err}") from err
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}:{lineno}: invalid JSON: {err.msg}") from err
            items.append(_check_entry(entry, root, f"{file}:{lineno}"))
    if not items:
        raise ValueError(f"{file}: no entries")
    return items


def load_image(path: str | PathLike, size: int) -> torch.Tensor:
    """Read an image as RGB, resize its shorter side to ``size`` (bicubic) and centre-crop to
    ``torch.uint8 [3, size, size]``."""
    size = check_int("size", size, 1)
    Image = _pil()
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class ImageCaptionFolder(Dataset):
    """``(image uint8 [3, S, S], caption)`` pairs from an image folder with a captions file.

    Args:
        root: the folder.
        image_size: output side ``S`` in pixels.
        captions: the captions file name inside ``root`` (``captions.jsonl`` or a ``.json`` list).
    """

    def __init__(self, root: str | PathLike, image_size: int = 32, captions: str = CAPTIONS_JSONL) -> None:
        self.root = Path(root)
        self.image_size = check_int("image_size", image_size, 1)  # True would give 1-pixel images
        self.items = read_captions(self.root, captions)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, text = self.items[index]
        return load_image(path, self.image_size), text


def export_shapes_folder(world: ShapesWorld, root: str | PathLike, n: int, start: int = 0) -> Path:
    """Write scenes ``start .. start + n - 1`` of ``world`` as ``root/images/{index:06d}.png`` plus
    ``root/captions.jsonl``. Returns the captions file path."""
    check_int("n", n, 1)  # n <= 0 wrote a captions file without entries
    check_int("start", start, 0)
    Image = _pil()
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(start, start + n):
        scene = world.scene(i)
        rel = f"images/{i:06d}.png"
        Image.fromarray(render(scene)).save(root / rel)
        lines.append(json.dumps({"image": rel, "caption": caption(scene)}))
    out = root / CAPTIONS_JSONL
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
