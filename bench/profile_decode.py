"""Where a decode step's time goes: kernels on the GPU vs everything else.

Reads the CSV that `ncu --csv --metrics gpu__time_duration.sum` wrote for a
module01_baseline bench run, finds the repeating pattern of kernel names
that one decode step launches (its period), and prints the kernels per step,
the GPU time per step (the sum of their durations), and the kernels that
take most of it. Compare the GPU time with the measured ms per token of the
same bench without ncu: the difference is launch overhead and host work.

    python3 bench/profile_decode.py ncu.csv [measured_ms_per_token]
"""

import collections
import csv
import sys


def load(path):
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(unit, 1e-6)
        # The grid tells launches of one kernel apart (the matrix-vector
        # kernel runs every product of a layer, each with its own grid).
        name = row["Kernel Name"]
        if row.get("Grid Size"):
            name = f"{name} grid {row['Grid Size'].replace(' ', '')}"
        rows.append((name, value * scale))
    return rows


def period(names, lo=50, hi=4000):
    """The smallest p such that the last 3p kernels repeat with period p.
    Shorter periods than `lo` are a step's layers repeating, not steps: a
    decode step of a real model launches more kernels than that."""
    for p in range(lo, min(hi, len(names) // 3)):
        tail = names[-3 * p:]
        if all(tail[i] == tail[i + p] for i in range(2 * p)):
            return p
    return None


def main():
    rows = load(sys.argv[1])
    measured = float(sys.argv[2]) if len(sys.argv) > 2 else None
    names = [n for n, _ in rows]
    p = period(names)
    print(f"kernels profiled: {len(rows)}")
    if p is None:
        print("no repeating decode step found")
        return
    step = rows[-p:]
    gpu_ms = sum(t for _, t in step)
    print(f"kernels per decode step: {p}")
    print(f"GPU time per decode step: {gpu_ms:.3f} ms (sum of kernel durations)")
    if measured:
        print(f"measured time per token:  {measured:.3f} ms -> GPU busy {100 * gpu_ms / measured:.0f} %")
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for n, t in step:
        by_name[n][0] += 1
        by_name[n][1] += t
    print(f"{'calls':>6} {'ms':>8} {'us/call':>8} {'share':>6}  kernel")
    for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"{c:>6} {t:>8.3f} {1e3 * t / c:>8.1f} {100 * t / gpu_ms:>5.1f}%  {n[:100]}")


if __name__ == "__main__":
    main()
