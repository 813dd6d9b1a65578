"""Fuzzing every op through the Python API and raw ``torch.ops.cm3leon.*`` (cases: tests/fuzz_cases.py).

Each batch of cases runs in a fresh subprocess, so a crash (segfault, abort) or a hang is reported with the
case that caused it instead of killing the test run. A new op joins by adding an ``OpSpec`` to
``fuzz_cases.SPECS``; the sweep below then covers it with every mutation and entry point.

``CM3LEON_FUZZ_BATCHES`` (default 3) sets how many random batches hypothesis draws: raise it for a longer
local run.
"""
from __future__ import annotations

import json
import os

import pytest
from fuzz_cases import MUTATIONS, SPECS
from helpers import run_isolated
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

BATCH = 30
BATCHES = int(os.environ.get("CM3LEON_FUZZ_BATCHES", "3"))


def _run(cases: list[tuple]) -> None:
    result = run_isolated(f"""
        from fuzz_cases import main
        main({json.dumps(cases)!r})
    """, timeout=300)
    lines = result.stdout.splitlines()
    findings = [f"{tuple(case)}: {line}" for case, line in zip(cases, lines) if line.startswith("BAD")]
    if result.returncode != 0:
        culprit = cases[len(lines)] if len(lines) < len(cases) else None
        findings.append(f"the process died (rc {result.returncode}) at case {culprit}: "
                        f"{result.stderr.strip()[-1500:]}")
    elif len(lines) != len(cases):
        findings.append(f"{len(lines)} results for {len(cases)} cases: {result.stderr[-1500:]}")
    assert not findings, "\n".join(findings)


def test_every_op_entry_and_mutation():
    """Deterministic sweep: each (op, entry point, mutation) at least once, each argument in turn."""
    cases = [(op, entry, mutation, i, 1000 * i + 17)
             for op, spec in sorted(SPECS.items()) for entry in sorted(spec.entries)
             for i, mutation in enumerate(MUTATIONS)]
    cases += [(op, entry, mutation, arg, 7919 * arg + 3)
              for op, spec in sorted(SPECS.items()) for entry in sorted(spec.entries)
              for mutation in ("meta", "nonfinite") for arg in range(len(spec.tensors))]
    _run(cases)


_CASE = st.sampled_from(sorted(SPECS)).flatmap(lambda op: st.tuples(
    st.just(op), st.sampled_from(sorted(SPECS[op].entries)), st.sampled_from(MUTATIONS),
    st.integers(0, 15), st.integers(0, 2 ** 31 - 1)))


@pytest.mark.skipif(BATCHES < 1, reason="CM3LEON_FUZZ_BATCHES=0")
@settings(max_examples=BATCHES, deadline=None, derandomize=True, database=None,
          phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure already names its case
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(_CASE, min_size=BATCH, max_size=BATCH))
def test_random_batches(cases):
    _run(cases)
