"""Loads the compiled extension, which registers the ops as ``torch.ops.cm3leon.*``."""
from __future__ import annotations

import torch  # noqa: F401  (the extension links against torch's libraries: load them first)

try:
    from . import _C
except ImportError as err:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "cm3leon_kernels._C is missing or was built against another torch. Rebuild with "
        "`pip install --no-build-isolation .` (or `make build` in a checkout)."
    ) from err

ops = torch.ops.cm3leon


def cuda_built() -> bool:
    """Whether this build contains the CUDA kernels."""
    return bool(_C.cuda_built())


def cpu_features() -> dict:
    """What the CPU kernels see and do on this machine.

    Returns ``{"cpu": {feature: bool}, "compiled": [levels], "supported": [levels], "isa": level,
    "ops": {op: level}}``: the features cpuid reports (``avx2``, ``fma``, ``f16c``, ``avx512f``, ``avx512dq``,
    ``avx512bw``, ``avx512vl``, ``avx512_bf16``, ``amx_bf16``), the instruction-set levels this build
    compiled (``baseline``, ``avx2``, ``avx512``, ``avx512_bf16``, ``amx_bf16``), those this CPU can run, the
    level chosen at load time (the highest supported one, or ``CM3LEON_CPU_ISA``) and the level each op's CPU
    kernel runs at, by ``torch.ops.cm3leon`` op name (an op without a body of its own at the chosen level runs
    its highest level below it; docs/kernels.md says what each level changes).
    """
    return dict(_C.cpu_features())


# Choose the level now, so that a bad CM3LEON_CPU_ISA (unknown name, or a level this CPU or build lacks)
# fails at import with a ValueError that names it, not inside the first kernel call.
cpu_features()
