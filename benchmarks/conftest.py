"""Ratio summary for the benchmark suites: after pytest-benchmark's own tables, one line per benchmark group
(a case) with each implementation's median time and its ratio to flashgen's (> 1: flashgen is faster).

A suite joins by setting `benchmark.group` to the case and `benchmark.extra_info["impl"]` to the
implementation ("flashgen" for ours) in each benchmark.
"""
from collections import defaultdict

import pytest


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None:
        return
    groups = defaultdict(dict)
    for bench in session.benchmarks:
        impl = bench.extra_info.get("impl")
        if impl and bench.stats and bench.stats.rounds:
            groups[bench.group][impl] = bench.stats.median
    groups = {g: times for g, times in groups.items() if "flashgen" in times and len(times) > 1}
    if not groups:
        return
    others = sorted({impl for times in groups.values() for impl in times} - {"flashgen"})
    width = max(len(g) for g in groups)
    tr = terminalreporter
    tr.section("flashgen vs eager: median time, ratio = other / flashgen")
    header = "".join(f"  {o + ' ms':>12} {'ratio':>6}" for o in others)
    tr.write_line(f"{'case':<{width}}  {'flashgen ms':>11}{header}")
    for group, times in groups.items():
        line = f"{group:<{width}}  {times['flashgen'] * 1e3:>11.3f}"
        for o in others:
            line += f"  {times[o] * 1e3:>12.3f} {times[o] / times['flashgen']:>6.2f}" if o in times else " " * 20
        tr.write_line(line)
