"""The CPU kernel bodies of each instruction-set level against a float64 oracle, outside torch.

tests/isa_oracle.cpp is built from the attention and loss kernel sources, once per level with that level's
compiler flags (read from CMakeLists.txt), as one static program, and checks random problems at the levels
asked for (see its header). Natively the test runs the levels this CPU supports; the pytest suite covers those
through torch as well, so the native run is marked slow.

With CM3LEON_ISA_EMULATOR set to a command that runs a static x86-64 program on an emulated CPU with AVX-512
(called as `$CM3LEON_ISA_EMULATOR PROGRAM ARGS...`, exit status passed through), the AVX-512 bodies are
checked too, on a host that lacks AVX-512 (docs/kernels.md, "Checking a level this CPU lacks").
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/attention/attention_cpu.cpp", "csrc/attention/attention_decode_cpu.cpp",
           "csrc/attention/attention_backward_cpu.cpp", "csrc/loss/loss_cpu.cpp"]
LEVELS = {0: "baseline", 1: "avx2", 2: "avx512"}  # the levels both families compile


def level_flags(level: int) -> list[str]:
    """The compiler flags CMakeLists.txt gives kernel objects of `level` (CM3LEON_ISA_FLAGS_<n>)."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    flags: list[str] = []
    for n in range(level + 1):
        body = re.search(rf"set\(CM3LEON_ISA_FLAGS_{n}\s+([^)]*)\)", cmake).group(1)
        own = [f.strip('"') for f in body.split() if not f.startswith("${")]
        flags = (flags if "${" in body else []) + [f for f in own if f]
    return flags


def build_oracle(out_dir: Path) -> Path:
    common = ["c++", "-std=c++17", "-O2", "-fno-math-errno", "-fopenmp", f"-I{ROOT / 'csrc'}",
              "-DCM3LEON_MAX_ISA_LEVEL=2"]
    jobs = [(common + ["-c", str(ROOT / "tests/isa_oracle.cpp"), "-o", str(out_dir / "main.o")])]
    for level in LEVELS:
        for src in SOURCES:
            obj = out_dir / f"{Path(src).stem}_isa{level}.o"
            jobs.append(common + level_flags(level) + [f"-DCM3LEON_ISA_LEVEL={level}", "-c", str(ROOT / src),
                                                       "-o", str(obj)])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs):
            assert result.returncode == 0, result.stderr[-4000:]
    exe = out_dir / "isa_oracle"
    # Lowest level first, as the extension links them: shared inline code then comes from baseline objects.
    objects = [str(out_dir / "main.o")] + [str(out_dir / f"{Path(s).stem}_isa{lv}.o") for lv in LEVELS for s in SOURCES]
    link = subprocess.run(["c++", "-static", "-fopenmp", *objects, "-o", str(exe)], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-4000:]
    return exe


def _native_levels() -> list[int]:
    import cm3leon_kernels

    supported = cm3leon_kernels.cpu_features()["supported"]
    return [level for level, name in LEVELS.items() if level > 0 and name in supported]


def _run(exe: Path, levels: list[int], prefix: list[str], seed: int, cases: int, timeout: int) -> None:
    cmd = prefix + [str(exe), str(seed), str(cases), *map(str, levels)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    failed = [line for line in result.stdout.splitlines() if line.endswith("FAIL")]
    assert result.returncode == 0 and not failed, (
        f"{shlex.join(cmd)} exited {result.returncode}\n" + "\n".join(failed[:40]) + "\n" + result.stdout[-3000:]
        + result.stderr[-2000:])
    assert result.stdout.rstrip().endswith("0 failed checks"), result.stdout[-3000:]


needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a host C++ compiler")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Path:
    return build_oracle(tmp_path_factory.mktemp("isa_oracle"))


@needs_compiler
@pytest.mark.slow
def test_levels_this_cpu_runs(oracle):
    _run(oracle, _native_levels(), [], seed=int.from_bytes(os.urandom(4), "little"), cases=6, timeout=600)


@needs_compiler
@pytest.mark.skipif(not os.environ.get("CM3LEON_ISA_EMULATOR"), reason="set CM3LEON_ISA_EMULATOR to check the "
                    "AVX-512 bodies on an emulated CPU")
def test_avx512_bodies_on_an_emulated_cpu(oracle):
    _run(oracle, [1, 2], shlex.split(os.environ["CM3LEON_ISA_EMULATOR"]),
         seed=int.from_bytes(os.urandom(4), "little"), cases=3, timeout=3600)
