"""Runs FlashAttention's own tests/test_flash_attn.py against cm3leon_kernels on the CPU.

    python tests/flash_attn_suite/run.py --source SRC [--max-seqlen 512] [--extra-per-test 0 | --full]
                                         [--workdir DIR] [-- PYTEST_ARGS...]

SRC is a flash-attn source: a checkout or mirror (a work tree, or a bare git directory read at HEAD), an sdist
(``pip download flash-attn==2.8.3.post2 --no-deps --no-binary :all:``), or the test file itself. The test file
needs ``einops`` (FlashAttention's test dependency) importable.

The file is rewritten in exactly these ways (each rewrite must match, so an upstream change is noticed):
- imports: ``flash_attn`` -> ``cm3leon_kernels`` (public functions, ``bert_padding``, and the in-test imports
  of ``flash_attn.flash_attn_interface``, whose private names then fail to import: counted as failures);
  the three non-API names (``_get_block_size_n``, ``USE_TRITON_ROCM``,
  ``flash_attn.layers.rotary.apply_rotary_emb``) come from fa_suite_shim.py;
- device: ``"cuda"`` -> ``"cpu"``; ``torch.cuda.get_device_capability("cuda")`` -> ``(8, 0)`` (the A100
  branch: bf16 and every head dim enabled); ``torch.cuda.get_device_properties("cuda").total_memory`` -> host
  memory.
FA's assertions are untouched. (Its fp32 exception is moot: 2.8's file has no float32 cases.)

Parametrisation (CPU budget): FA's grid is ~20k cases sized for a GPU. By default each test function keeps the
cases whose ``seqlen*`` parameters are all <= ``--max-seqlen``, and of those a covering subset: cases in a
fixed pseudo-random order (sha1 of the test id), each kept if it brings a parameter value not yet covered by
the kept cases, plus ``--extra-per-test`` more. So every value of every parameter (each head dim, dtype,
causal/local/alibi/deterministic flag, ...) runs at least once per test function where the size limit allows.
``--full`` runs the whole grid. Results (outcome and failure message per case) go to WORKDIR/results.json and
a summary with failure categories is printed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]  # the checkout under test comes first on sys.path (not an installed cm3leon_kernels)
TEST_PATH = "tests/test_flash_attn.py"

REWRITES = [  # (old, new): every one must occur in the file
    ("from flash_attn import (", "from cm3leon_kernels import ("),
    ("from flash_attn.bert_padding import", "from cm3leon_kernels.bert_padding import"),
    (
        "from flash_attn.flash_attn_interface import _get_block_size_n, USE_TRITON_ROCM",
        "from fa_suite_shim import _get_block_size_n, USE_TRITON_ROCM, host_memory",
    ),
    ("from flash_attn.layers.rotary import apply_rotary_emb", "from fa_suite_shim import apply_rotary_emb"),
    ("from flash_attn.flash_attn_interface import", "from cm3leon_kernels.flash_attn_interface import"),
    ('torch.cuda.get_device_capability("cuda")', "(8, 0)"),
    ('torch.cuda.get_device_properties("cuda").total_memory', "host_memory()"),
    ('"cuda"', '"cpu"'),
]


def read_source(src: Path) -> str:
    if src.suffix == ".py":
        return src.read_text()
    if src.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(src) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/" + TEST_PATH))
            return tar.extractfile(member).read().decode()
    if (src / TEST_PATH).is_file():
        return (src / TEST_PATH).read_text()
    return subprocess.run(
        ["git", "-C", str(src), "show", f"HEAD:{TEST_PATH}"], check=True, capture_output=True, text=True
    ).stdout


def rewrite(text: str) -> str:
    for old, new in REWRITES:
        if old not in text:
            raise SystemExit(f"rewrite pattern not found in {TEST_PATH}: {old!r} (the upstream file changed)")
        text = text.replace(old, new)
    code = [ln.split("#")[0] for ln in text.splitlines()]
    leftover = [
        ln for ln in code if re.search(r"\bflash_attn\.|torch\.cuda|'cuda'", ln) and "cm3leon" not in ln
    ]
    if leftover:
        raise SystemExit(f"unrewritten flash_attn / CUDA references remain: {leftover[:3]}")
    return text


def _size_ok(params: dict, max_seqlen: int) -> bool:
    return all(v <= max_seqlen for k, v in params.items() if k.startswith("seqlen") and isinstance(v, int))


def _order(item) -> str:
    return hashlib.sha1(item.nodeid.encode()).hexdigest()


class Sampler:
    """Keeps a covering subset of each test function's cases (see the module docstring)."""

    def __init__(self, max_seqlen: int, extra: int, full: bool):
        self.max_seqlen, self.extra, self.full = max_seqlen, extra, full

    def pytest_collection_modifyitems(self, config, items):
        if self.full:
            return
        groups = collections.defaultdict(list)
        for item in items:
            groups[getattr(item, "originalname", item.name)].append(item)
        keep = []
        for group in groups.values():
            params = {it.nodeid: getattr(getattr(it, "callspec", None), "params", {}) for it in group}
            eligible = sorted(
                (it for it in group if _size_ok(params[it.nodeid], self.max_seqlen)), key=_order
            )
            covered, chosen, rest = set(), [], []
            for it in eligible:
                values = {(k, repr(v)) for k, v in params[it.nodeid].items()}
                (chosen if values - covered or not chosen else rest).append(it)
                covered |= values
            keep += chosen + rest[: self.extra]
        kept = set(id(it) for it in keep)
        config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
        items[:] = [it for it in items if id(it) in kept]


class Recorder:
    def __init__(self):
        self.results: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            entry = {"outcome": report.outcome, "seconds": round(report.duration, 2)}
            if report.outcome != "passed":
                crash = getattr(report.longrepr, "reprcrash", None)
                entry["message"] = crash.message if crash else str(report.longrepr)[-300:]
            if report.nodeid not in self.results or report.outcome != "passed":
                self.results[report.nodeid] = entry


def category(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "?"
    first = (
        re.sub(r"assert .*", "assert (FA error bound: error <= 2x PyTorch's)", first)
        if first.startswith("assert ") and "<=" in first
        else first
    )
    return re.sub(r"(?<![\w.])-?\d+(\.\d+)?(e-?\d+)?", "N", first)[:140]


def summarise(results: dict[str, dict]) -> str:
    lines = []
    by_fn = collections.defaultdict(collections.Counter)
    cats = collections.defaultdict(collections.Counter)
    for nodeid, r in results.items():
        fn = nodeid.split("::")[-1].split("[")[0]
        by_fn[fn][r["outcome"]] += 1
        if r["outcome"] == "failed":
            cats[category(r.get("message", ""))][fn] += 1
    total = collections.Counter(r["outcome"] for r in results.values())
    lines.append(f"total: {dict(total)}")
    for fn, c in sorted(by_fn.items()):
        lines.append(f"  {fn:48s} {dict(c)}")
    lines.append("failure categories (message with numbers as N: count per test function):")
    for cat, fns in sorted(cats.items(), key=lambda kv: -sum(kv[1].values())):
        lines.append(f"  [{sum(fns.values())}] {cat}")
        lines.append(f"        {dict(fns)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", type=Path, required=True, help="flash-attn checkout, bare git dir, sdist or file"
    )
    parser.add_argument(
        "--max-seqlen", type=int, default=512, help="largest seqlen* parameter kept (default 512)"
    )
    parser.add_argument("--extra-per-test", type=int, default=0, help="cases kept beyond the covering subset")
    parser.add_argument("--full", action="store_true", help="run FA's whole grid (GPU-sized: days on a CPU)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cm3leon_fa_suite")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (e.g. -k kvcache -x)")
    args = parser.parse_args(argv)
    try:
        import einops  # noqa: F401
    except ImportError:
        raise SystemExit("FlashAttention's tests need einops: pip install einops") from None

    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    test_file = args.workdir / "test_flash_attn.py"
    test_file.write_text(rewrite(read_source(args.source)))
    # The checkout ahead of an installed cm3leon_kernels, but PYTHONPATH ahead of both (a test build placed
    # there on purpose: tests/emulated_levels.py).
    sys.path[:0] = [str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), str(REPO)]

    import pytest

    recorder = Recorder()
    code = pytest.main(
        [
            str(test_file),
            "-q",
            "--rootdir",
            str(args.workdir),
            "-c",
            str(args.workdir / "pytest.ini"),
            *args.pytest_args,
        ],
        plugins=[Sampler(args.max_seqlen, args.extra_per_test, args.full), recorder],
    )
    (args.workdir / "results.json").write_text(json.dumps(recorder.results, indent=1))
    summary = summarise(recorder.results)
    (args.workdir / "summary.txt").write_text(summary + "\n")
    print(summary)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
