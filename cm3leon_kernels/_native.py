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


def cpu_features() -> dict[str, bool]:
    """SIMD features the CPU kernels were compiled for (e.g. ``{"avx2_fma": True, "f16c": True}``)."""
    return dict(_C.cpu_features())
