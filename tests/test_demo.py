"""The demo end to end at toy size: every stage runs, the report and its pictures are written, and a rerun
skips the finished stages."""
import json

import pytest

from cm3leon.demo import SCALES, run_demo
from cm3leon.demo.fidelity import verdict


def test_toy_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_demo(out, "toy", progress=False)
    seed = results[0]
    for stage in ("corpus", "retrieval", "pretrain", "sft", "evaluate"):
        assert json.loads((out / "seed-0" / stage / "done.json").read_text()), stage
    report = (out / "report.md").read_text()
    assert "| area | the publications' claim | our figure | reproduced |" in report
    assert report.count("| SFT |") == 4 and report.count("| retrieval |") == 2
    assert (out / "seed-0" / "evaluate" / "text_to_image.png").stat().st_size > 0
    assert (out / "seed-0" / "pretrain" / "model.safetensors").is_file()
    evaluation = seed["evaluate"]
    prompts = SCALES["toy"].prompts
    assert all(len(evaluation["retrieval"][k]["alignment"]) == prompts for k in ("0", "1", "2"))
    assert all(0.0 <= v <= 1.0 for v in evaluation["sft"]["after"]["vqa"])
    assert "reproduced" in capsys.readouterr().out or "measured" in report

    again = run_demo(out, "toy", progress=False)  # everything recorded: nothing is trained or generated again
    assert again[0]["evaluate"] == evaluation and again[0]["stage_seconds"] == seed["stage_seconds"]


def test_verdict_needs_the_difference_to_exceed_both_intervals():
    assert verdict([1.0, 0.9, 1.0, 0.95], [0.1, 0.0, 0.2, 0.1]) == "yes"
    assert verdict([0.1, 0.0, 0.2, 0.1], [1.0, 0.9, 1.0, 0.95]) == "no"
    assert verdict([0.5, 0.0, 1.0, 0.5], [0.4, 0.1, 0.9, 0.5]) == "not resolved"
    assert verdict([2.0, 2.1, 2.0], [3.0, 3.1, 3.0], higher_is_better=False) == "yes"
    with pytest.raises(ValueError):
        verdict([], [1.0])


@pytest.mark.parametrize("scale,error", [("huge", ValueError), (None, TypeError), (3, TypeError)])
def test_unknown_scales_are_refused_before_any_work(tmp_path, scale, error):
    with pytest.raises(error, match="scale"):
        run_demo(tmp_path / "demo", scale, progress=False)
    assert not (tmp_path / "demo").exists()
