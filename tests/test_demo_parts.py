"""The demo's building blocks: resumable run folder, confidence intervals, image grids."""
import json
import math

import pytest
import torch
from PIL import Image

from cm3leon.demo.grids import GridRow, save_grid
from cm3leon.demo.run_folder import RunFolder
from cm3leon.demo.stats import mean_ci, wilson_interval


def test_run_folder_records_and_skips_finished_stages(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert run.result("tokenizers") is None
    run.finish("tokenizers", {"psnr": 30.5})
    assert RunFolder(tmp_path / "run").result("tokenizers") == {"psnr": 30.5}
    (tmp_path / "run" / "tokenizers" / "done.json").write_text('{"psnr": 3')  # cut short by a crash
    assert run.result("tokenizers") is None


def test_mean_ci_matches_the_normal_formula():
    values = [0.0, 1.0, 1.0, 0.0, 1.0]
    mean, half = mean_ci(values)
    std = math.sqrt(sum((v - 0.6) ** 2 for v in values) / 4)
    assert mean == pytest.approx(0.6) and half == pytest.approx(1.959964 * std / math.sqrt(5))
    assert mean_ci([2.0]) == (2.0, math.inf)
    with pytest.raises(ValueError, match="values"):
        mean_ci([])


def test_wilson_interval_contains_the_proportion_and_stays_in_unit_range():
    for k, n in [(0, 10), (3, 10), (10, 10), (50, 100)]:
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_grid_places_images_and_frames_the_pick(tmp_path):
    images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    images[1] = 200
    path = tmp_path / "grid.png"
    save_grid(path, [GridRow("a red circle", images, pick=2), GridRow("b", images[:2])], scale=2, pad=4)
    grid = Image.open(path).convert("RGB")
    assert grid.size == (4 + 3 * (16 + 4), 4 + 2 * (14 + 16 + 4))
    assert grid.getpixel((4 + 20 + 5, 4 + 14 + 5)) == (200, 200, 200)  # second sample of row 0
    assert grid.getpixel((4 + 40 - 1, 4 + 14 + 5)) == (255, 0, 200)    # frame left of the pick
    with pytest.raises(ValueError, match="rows"):
        save_grid(path, [])
    with pytest.raises(ValueError, match=r"rows\[0\].images"):
        save_grid(path, [GridRow("x", images.float())])
