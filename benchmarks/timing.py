"""Timing helpers shared by the CPU benchmark scripts (imported as `timing`: benchmarks/ is on sys.path both when a
script runs as `python benchmarks/<name>.py` and under pytest, which puts a test file's folder first)."""
import time

import pytest
import torch


def best_time(fn, rounds=5, min_time=0.0, clock=time.perf_counter):
    """Seconds per call of `fn`: the minimum over `rounds` rounds of (round time / calls in the round).

    A round calls fn until it has spent min_time / rounds (at least once), so fast calls are averaged over many
    repetitions while slow ones are timed one by one. The minimum is the estimate least inflated by other load.
    fn runs once before timing (lazy initialisation, first-touch page faults). clock=time.thread_time measures
    the CPU time of the calling thread (meaningful with one torch thread), which other jobs on a shared machine
    do not inflate the way they inflate wall time.
    """
    fn()
    times = []
    for _ in range(rounds):
        reps, start = 0, clock()
        while True:
            fn()
            reps += 1
            if clock() - start >= min_time / rounds:
                break
        times.append((clock() - start) / reps)
    return min(times)


def fixed_threads(n):
    """An autouse fixture for a benchmark module (`_threads = fixed_threads(2)`): each test runs with
    torch.set_num_threads(n), and the previous count is restored after it."""

    @pytest.fixture(autouse=True)
    def _fixed_threads():
        """torch.set_num_threads(n) for this test."""
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        yield
        torch.set_num_threads(before)

    return _fixed_threads
