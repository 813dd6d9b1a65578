"""bench/cpu_targets.py's verdicts, on a synthetic pytest-benchmark result (no benchmark runs)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cpu_targets  # noqa: E402


def _bench(case: str, impl: str, median: float, work: float = 1e9) -> dict:
    return {"group": case, "name": case, "stats": {"median": median},
            "extra_info": {"impl": impl, "work": work}}


def test_targets_are_judged_by_rate_ratios():
    attn, vq = cpu_targets.ATTN.format("bf16"), cpu_targets.VQ.format("fp32")
    data = {"benchmarks": [
        _bench(attn, "cm3leon", 1.0), _bench(attn, "torch.sdpa", 2.0), _bench(attn, "cm3leon[avx2]", 0.98),
        _bench(attn, "cm3leon[avx512]", 1.5),
        # The peak does four times the work in the same time: cm3leon runs at 0.25x its rate.
        _bench("bf16 matmul peak (torch.mm 2048^3)", "torch.mm", 1.0, work=4e9),
        _bench(vq, "cm3leon", 1.0), _bench(vq, "faiss-IndexFlatL2", 1.3),
    ]}
    verdicts = {what: (ratio, verdict) for what, ratio, verdict in cpu_targets.judge(data)}
    assert verdicts["bf16 attention forward vs the bf16 matmul peak (>= 0.5x)"] == ("0.25x", "missed")
    assert verdicts["bf16 attention forward vs SDPA (>= 2.5x)"] == ("2.00x", "missed")
    assert verdicts["fp32 vq_nearest vs faiss (>= 1.2x)"] == ("1.30x", "met")
    assert verdicts["bf16 vq_nearest vs torch.mm bf16 (>= 0.5x)"] == ("-", "not measured")
    assert verdicts[f"{attn}: cm3leon vs cm3leon[avx2] (>= 1x)"] == ("0.98x", "met")  # within the tolerance
    assert verdicts[f"{attn}: cm3leon vs cm3leon[avx512] (>= 1x)"] == ("1.50x", "met")
    slower = {"benchmarks": data["benchmarks"] + [_bench(vq, "cm3leon[avx2]", 0.9)]}
    assert dict((w, v) for w, _, v in cpu_targets.judge(slower))[f"{vq}: cm3leon vs cm3leon[avx2] (>= 1x)"] \
        == "missed"
