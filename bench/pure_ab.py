"""Same-process A/B of bench/correlate.py's pure work: a base revision against this tree.

On a shared, loaded machine only ratios measured in one process, alternating, mean
anything. The base revision's agent, streams and bench are copied (git archive) into a
temporary directory as packages base_agent, base_streams, base_bench (their imports
rewritten), so both versions run side by side on the same records, old and new in
alternating order each round, the first round not counted.

Usage: python bench/pure_ab.py [--base REV] [--count N] [--rounds R] [--cpu] [--freeze]
--cpu: time the stages in this thread's CPU time (preemption by other processes is then
not counted); --freeze: the correlator's GC settings (agent.runtime.freeze_heap), under
which full collections no longer walk the start-up heap: with the default settings they
land in whichever stage is running and move time between stages from run to run.
Prints the per-stage median us/anomaly of each and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IMPORT = re.compile(r"^(\s*)(from|import) (agent|streams|handlers|bench)\b", re.MULTILINE)


def snapshot(rev: str, into: Path) -> None:
    """The base revision's packages under ``into``, renamed base_*."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "agent", "streams", "handlers", "bench"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    for name in ("agent", "streams", "handlers", "bench"):
        (into / name).rename(into / f"base_{name}")
    (into / "base_bench" / "__init__.py").touch()
    for path in into.rglob("*.py"):
        text = path.read_text()
        path.write_text(IMPORT.sub(r"\1\2 base_\3", text))
    # agent.settings finds the default config next to its package.
    (into / "config").symlink_to(ROOT / "config")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="main")
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=100, help="anomalies per record")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--freeze", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        snapshot(args.base, Path(tmp))
        sys.path[:0] = [str(ROOT), tmp]
        from base_bench.correlate import pure_work as old  # type: ignore[import-not-found]

        from bench.correlate import batched, make_anomalies
        from bench.correlate import pure_work as new

        if args.cpu:  # pure_work reads time.perf_counter: this thread's CPU time instead
            time.perf_counter = time.thread_time
        if args.freeze:
            from agent.runtime import freeze_heap

            freeze_heap()
        records = batched(make_anomalies(args.count), args.batch)
        # As bench/correlate.py sizes its batches: 2000 records or 16 MiB.
        size = max(1, min(2000, (16 << 20) // max(1, len(records[0][1]))))
        runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        pair: list[tuple[str, Callable[..., dict[str, float]]]] = [("old", old), ("new", new)]
        for n in range(args.rounds + 1):
            for name, work in pair if n % 2 == 0 else pair[::-1]:
                gc.collect()
                out = work(records, size)
                if n:  # the first round warms up
                    runs[name].append(out)
    print(f"{args.count} anomalies, {size} records a batch, base {args.base}")
    print(f"{'stage':10} {'old us':>8} {'new us':>8} {'new/old':>8}")
    for stage in [*runs["old"][0], "total"]:

        def of(d: dict[str, float], stage: str = stage) -> Any:
            return sum(d.values()) if stage == "total" else d[stage]

        o = statistics.median(of(d) * 1e6 for d in runs["old"])
        w = statistics.median(of(d) * 1e6 for d in runs["new"])
        r = statistics.median(of(b) / of(a) for a, b in zip(runs["old"], runs["new"], strict=True))
        print(f"{stage:10} {o:8.2f} {w:8.2f} {r:8.3f}")


if __name__ == "__main__":
    main()
