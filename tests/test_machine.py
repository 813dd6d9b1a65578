"""The host line of reports: CPU model and SIMD features read from /proc/cpuinfo."""
from pathlib import Path

from cm3leon.machine import describe_machine


def test_reads_model_name_and_simd_flags(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse avx2 fma avx512f amx_bf16\n"
                    "processor\t: 1\nmodel name\t: Example CPU 9000\nflags\t\t: fpu\n")
    line = describe_machine(info)
    assert line.startswith("Example CPU 9000, ")
    assert line.endswith("(avx2, fma, avx512f, amx_bf16)")


def test_without_simd_flags_or_cpuinfo(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Plain\nflags\t\t: fpu sse\n")
    assert describe_machine(info).endswith("(no AVX2)")
    assert "cores" in describe_machine(tmp_path / "missing")
