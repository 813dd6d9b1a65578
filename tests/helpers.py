"""Shared test utilities: the FlashAttention tolerance rule, output poisoning, isolated subprocess runs."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# The floating dtypes every kernel accepts, float32 first.
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def fa_rule_bound(reference: torch.Tensor, baseline: torch.Tensor, factor: float = 2.0,
                  eps: float = 1e-6) -> float:
    """The largest error a kernel may have: ``factor`` x plain PyTorch's error (``baseline``, computed in
    the kernel's precision) against the float64 ``reference``, plus ``eps``."""
    return factor * (baseline.double() - reference.double()).abs().max().item() + eps


def assert_fa_rule(out: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor, *, name: str,
                   factor: float = 2.0, eps: float = 1e-6) -> None:
    assert out.shape == reference.shape, f"{name}: shape {tuple(out.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten/poisoned elements?)"
    err = (out.double() - reference.double()).abs().max().item() if out.numel() else 0.0
    bound = fa_rule_bound(reference, baseline, factor, eps) if out.numel() else eps
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} ({factor}x PyTorch + {eps})"


@contextlib.contextmanager
def poisoned_outputs():
    """Makes every tensor allocated with torch.empty (also inside our C++ launchers) start as NaN (floats)
    or the dtype's max (integers), so elements a kernel forgets to write cannot pass as valid."""
    import torch.utils.deterministic as det

    prev_det, prev_warn = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = prev_fill
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)


ROOT = Path(__file__).resolve().parents[1]


def run_isolated(code: str, *, timeout: float = 120.0, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (on the path: the caller's PYTHONPATH, then this checkout's
    packages and the test support modules), so a crash or a hang fails the calling test instead of killing
    pytest. Returns the ``CompletedProcess`` (text output)."""
    path = os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(ROOT), str(ROOT / "tests"))))
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
