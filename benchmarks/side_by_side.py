"""Timing runs side by side: one warm-up each, then `repeats` interleaved rounds; medians and ratios to "plain"."""
import statistics
import time


def interleaved_medians(runs: dict, repeats: int, sync=lambda: None) -> dict:
    """{name: median seconds} of each zero-argument run; `sync` waits for queued device work before a clock read."""
    for run in runs.values():  # warm-up: weights loaded, memory allocated
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_ratios(medians: dict, width: int = 40) -> None:
    plain = medians["plain"]
    print(f"{'run':<{width}} {'median s':>9} {'/ plain':>8}")
    for name, median in medians.items():
        print(f"{name:<{width}} {median:>9.3f} {median / plain:>8.3f}")
