"""The recipe-fidelity table: each row a claim of the publications, our figure, and whether it reproduced.

A claim counts as reproduced ("yes") when our figures move in the claimed direction by more than their
95% confidence intervals together; "no" when they move the other way by that much; otherwise the
measurement cannot tell at this size ("not resolved").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .stats import mean_ci


@dataclass(frozen=True)
class FidelityRow:
    area: str
    claim: str
    ours: str
    verdict: str


def verdict(better: Sequence[float], worse: Sequence[float], *, higher_is_better: bool = True) -> str:
    """Is ``better`` really better than ``worse``? (see the module docstring)"""
    (m_b, h_b), (m_w, h_w) = mean_ci(better), mean_ci(worse)
    gain = (m_b - m_w) if higher_is_better else (m_w - m_b)
    if gain > h_b + h_w:
        return "yes"
    if -gain > h_b + h_w:
        return "no"
    return "not resolved"


def markdown_table(rows: Sequence[FidelityRow]) -> str:
    lines = ["| area | the publications' claim | our figure | reproduced |", "|---|---|---|---|"]
    lines += [f"| {r.area} | {r.claim} | {r.ours} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[FidelityRow]) -> str:
    """The table for a terminal: one block per row."""
    out = []
    for r in rows:
        out.append(f"[{r.verdict:>12}] {r.area}: {r.claim}\n               ours: {r.ours}")
    return "\n".join(out)
