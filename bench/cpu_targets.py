"""The CPU kernel-level targets in one run: benchmarks the cases below, prints the comparison table
(bench/report.py), then each target's measured ratio and whether it was met.

    python bench/cpu_targets.py [--json PATH] [--from-json PATH]

Cases: causal attention forward and backward, fp32 and bf16 (B 1, H 16, S 2048, D 64), beside SDPA and the
kernels forced to lower levels; the fp32 and bf16 matmul peaks (torch.mm 2048^3); vq_nearest at the tokenizer
shape (N 16384, K 8192, D 256), fp32 beside faiss and bf16 beside torch.mm of the same inputs; the bf16 fused
loss. ``--from-json`` re-reads an earlier run instead of benchmarking.

Targets, meant for a host with AVX-512 BF16 or AMX (the table names the host's features):
- bf16 attention forward: >= 0.5x the bf16 matmul peak's GFLOP/s and >= 2.5x SDPA;
- bf16 vq_nearest: >= 0.5x torch.mm's GFLOP/s on the same bf16 inputs;
- fp32 attention forward >= 1.3x SDPA; fp32 vq_nearest >= 1.2x faiss IndexFlatL2;
- in every case, ``cm3leon`` (the level chosen at load time) at least as fast as each forced lower level
  (``cm3leon[avx2]``, ...), within 3% (two runs of the same level differ by about that under no load).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SELECTION = ("not cuda and (forward_causal or backward_causal or matmul_peak or bf16_inputs or "
             "(tokenizer_shape and (cm3leon or faiss)) or linear_cross_entropy_bf16)")
ATTN = "attn fwd causal {} B=1 H=16 S=2048 D=64"
VQ = "vq_nearest N=16384 K=8192 D=256 {}"
# (target, case, reference case, reference impl, minimum ratio of cm3leon's rate to the reference's)
TARGETS = [
    ("bf16 attention forward vs the bf16 matmul peak", ATTN.format("bf16"),
     "bf16 matmul peak (torch.mm 2048^3)", "torch.mm", 0.5),
    ("bf16 attention forward vs SDPA", ATTN.format("bf16"), ATTN.format("bf16"), "torch.sdpa", 2.5),
    ("bf16 vq_nearest vs torch.mm bf16", VQ.format("bf16"), VQ.format("bf16"), "torch.mm-bf16", 0.5),
    ("fp32 attention forward vs SDPA", ATTN.format("fp32"), ATTN.format("fp32"), "torch.sdpa", 1.3),
    ("fp32 vq_nearest vs faiss", VQ.format("fp32"), VQ.format("fp32"), "faiss-IndexFlatL2", 1.2),
]
LEVEL_TOLERANCE = 0.97


def rates(data: dict) -> dict[tuple[str, str], float]:
    """(case, impl) -> work per second, for the benchmarks that declare their work."""
    out = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if info.get("work"):
            out[(b["group"] or b["name"], info["impl"])] = info["work"] / b["stats"]["median"]
    return out


def judge(data: dict) -> list[tuple[str, str, str]]:
    """(target, measured ratio, verdict) for every target whose benchmarks are in `data`."""
    rate = rates(data)
    lines = []
    for what, case, ref_case, ref_impl, minimum in TARGETS:
        ours, ref = rate.get((case, "cm3leon")), rate.get((ref_case, ref_impl))
        if ours is None or ref is None:
            lines.append((f"{what} (>= {minimum}x)", "-", "not measured"))
            continue
        ratio = ours / ref
        lines.append((f"{what} (>= {minimum}x)", f"{ratio:.2f}x", "met" if ratio >= minimum else "missed"))
    for (case, impl), forced in sorted(rate.items()):
        if not re.fullmatch(r"cm3leon\[\w+\]", impl) or (case, "cm3leon") not in rate:
            continue
        ratio = rate[(case, "cm3leon")] / forced
        verdict = "met" if ratio >= LEVEL_TOLERANCE else "missed"
        lines.append((f"{case}: cm3leon vs {impl} (>= 1x)", f"{ratio:.2f}x", verdict))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "cm3leon_cpu_targets.json",
                        help="where the benchmark results go")
    parser.add_argument("--from-json", type=Path,
                        help="judge an earlier run's results instead of benchmarking")
    args = parser.parse_args()
    path = args.from_json or args.json
    if args.from_json is None:
        files = [str(HERE / name) for name in ("bench_attention.py", "bench_vq.py", "bench_loss.py")]
        subprocess.run([sys.executable, "-m", "pytest", *files, "-o", "python_files=bench_*.py", "-q",
                        "--benchmark-enable", f"--benchmark-json={path}", "-k", SELECTION], check=True)
    subprocess.run([sys.executable, str(HERE / "report.py"), str(path)], check=True)
    lines = judge(json.loads(path.read_text()))
    width = max(len(line[0]) for line in lines)
    print()
    for what, ratio, verdict in lines:
        print(f"{what.ljust(width)}  {ratio:>7}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
