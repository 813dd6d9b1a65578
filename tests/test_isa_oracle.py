"""The CPU kernel bodies of each instruction-set level against a float64 oracle, outside torch.

tests/isa_oracle.cpp is built from the attention, loss and VQ kernel sources (and tests/isa_rounding.cpp, the
bf16 rounding helpers), once per level with that level's compiler flags (read from CMakeLists.txt), as one
static program, and checks random problems at every level (see its header). A level this CPU lacks is
compiled instead for the host's highest level with tests/isa_emulation.h forced in: SIMDe (the simde-py test
dependency) implements the AVX-512 (and AVX-512 BF16) intrinsics with AVX2 ones and AMX tiles are emulated in
memory, so those bodies' logic (16 lanes, mask registers, the 6 x 32 micro-kernel tile, bf16 pairs, tile
blocks) is checked on machines without them. On a CPU with AVX-512 the real instructions run.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each family's sources and highest level (as in CMakeLists.txt's cm3leon_cpu_family calls).
FAMILIES = {4: ["csrc/attention/attention_cpu.cpp", "csrc/attention/attention_decode_cpu.cpp",
                "csrc/attention/attention_backward_cpu.cpp", "csrc/vq/vq_cpu.cpp", "csrc/loss/loss_cpu.cpp",
                "tests/isa_rounding.cpp"]}  # the last: the bf16 rounding helpers, checked per level
LEVELS = {0: "baseline", 1: "avx2", 2: "avx512", 3: "avx512_bf16", 4: "amx_bf16"}
EMULATION = Path(__file__).with_name("isa_emulation.h")


def level_flags(level: int) -> list[str]:
    """The compiler flags CMakeLists.txt gives kernel objects of `level` (CM3LEON_ISA_FLAGS_<n>)."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    flags: list[str] = []
    for n in range(level + 1):
        body = re.search(rf"set\(CM3LEON_ISA_FLAGS_{n}\s+([^)]*)\)", cmake).group(1)
        own = [f.strip('"') for f in body.split() if not f.startswith("${")]
        flags = (flags if "${" in body else []) + [f for f in own if f]
    return flags


def simde_include() -> Path | None:
    """The directory holding simde/x86/avx512.h (from the simde-py package), or None."""
    try:
        import simde_py
    except ImportError:
        return None
    base = Path(simde_py.get_include())
    return next((p for p in (base, base.parent) if (p / "simde/x86/avx512.h").exists()), None)


def supported_levels() -> list[int]:
    import cm3leon_kernels

    supported = cm3leon_kernels.cpu_features()["supported"]
    return [level for level, name in LEVELS.items() if name in supported]


def build_oracle(out_dir: Path, emulated: set[int]) -> Path:
    """Compiles and links the oracle; levels in `emulated` are built for the host's highest supported level
    with the SIMDe forced include."""
    common = ["c++", "-std=c++17", "-O2", "-fno-math-errno", "-fopenmp", f"-I{ROOT / 'csrc'}",
              "-DCM3LEON_MAX_ISA_LEVEL=4"]
    host_level = max(supported_levels())
    jobs = [common + ["-c", str(ROOT / "tests/isa_oracle.cpp"), "-o", str(out_dir / "main.o")]]
    objects = [out_dir / "main.o"]
    for level in LEVELS:
        flags = level_flags(level)
        if level in emulated:
            flags = level_flags(host_level) + ["-Wno-psabi", f"-I{simde_include()}",
                                               "-include", str(EMULATION)]
        for src in [src for top, sources in FAMILIES.items() if level <= top for src in sources]:
            obj = out_dir / f"{Path(src).stem}_isa{level}.o"
            objects.append(obj)  # lowest level first, as the extension links them
            jobs.append(common + flags + [f"-DCM3LEON_ISA_LEVEL={level}", "-c", str(ROOT / src),
                                          "-o", str(obj)])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs):
            assert result.returncode == 0, result.stderr[-4000:]
    exe = out_dir / "isa_oracle"
    link = subprocess.run(["c++", "-static", "-fopenmp", *map(str, objects), "-o", str(exe)],
                          capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-4000:]
    return exe


def run_oracle(exe: Path, levels: list[int], seed: int, cases: int) -> str:
    cmd = [str(exe), str(seed), str(cases), *map(str, levels)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    failed = [line for line in result.stdout.splitlines() if line.endswith("FAIL")]
    assert result.returncode == 0 and not failed, (
        f"{' '.join(cmd)} exited {result.returncode}\n" + "\n".join(failed[:40]) + "\n"
        + result.stderr[-2000:])
    assert result.stdout.rstrip().endswith("0 failed checks"), result.stdout[-3000:]
    return result.stdout


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a host C++ compiler")
def test_every_level_against_float64(tmp_path):
    native = [level for level in supported_levels() if level > 0]
    missing = [level for level in LEVELS if level > 0 and level not in native]
    # Levels this CPU lacks run through SIMDe where it can stand in (an AVX2 host with simde-py installed).
    emulated = missing if simde_include() is not None and 1 in native else []
    levels = native + emulated
    if not levels:
        pytest.skip("this CPU has no vector level, and no level can be emulated")
    exe = build_oracle(tmp_path, set(emulated))
    out = run_oracle(exe, levels, seed=int.from_bytes(os.urandom(4), "little"), cases=9)
    for level in levels:  # every level was really run and judged
        assert re.search(rf"level {level}: error \S+ \(limit \S+\) ok", out), f"level {level} never ran"
        assert re.search(rf"bf16 rounding level {level}: 0 of [1-9]\d* words differ", out), out[-2000:]
