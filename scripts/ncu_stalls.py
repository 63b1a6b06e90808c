#!/usr/bin/env python3
"""Where a kernel's warps stall, from an Nsight Compute report's PC samples.

Nsight Compute samples, every few cycles, the program counter of one warp
per scheduler and why that warp is not issuing (waiting at a barrier, for
a load, for an instruction...). This script sums those samples by stall
reason, by source line and by the function each line belongs to, so the
report can be read on a machine without a GPU or the Nsight Compute GUI.

Make the report on the GPU machine (the layer kernel of one decode step;
SPARK_DISAGG_KERNEL_LINEINFO=1 gives NVRTC's -lineinfo, so samples map to
lines of decode.cu, which ncu finds from that directory), then read it
anywhere:

    cd shared/src/kernels && SPARK_DISAGG_KERNEL_LINEINFO=1 ncu --clock-control none \\
        --kernel-name decode_layer --launch-skip 200 --launch-count 1 \\
        --section WarpStateStats --section SourceCounters --import-source yes \\
        -o /tmp/layer ../../../target/release/module01_baseline bench \\
        --random tinyllama-1.1b --dtype bf16 --prompt-len 64 --output-len 16 \\
        --batch-sizes 1 --num-requests 0 --json /tmp/b.json --svg /tmp/b.svg
    pip install ncu-report      # NVIDIA's reader of .ncu-rep files
    python3 scripts/ncu_stalls.py /tmp/layer.ncu-rep [--source decode.cu] [--lines 30]

--source names the file the kernel was compiled from, as it was then
(`git show COMMIT:shared/src/kernels/decode.cu`), so that lines can also be
grouped by the function they belong to.
"""

import argparse
import collections
import os
import re
import sys

PREFIX = "smsp__pcsamp_warps_issue_stalled_"


def load_samples(path):
    """Per program counter: (samples, Counter of stall reasons, (file, line))."""
    try:
        import ncu_report
    except ImportError:
        sys.exit("ncu_stalls.py needs NVIDIA's report reader: pip install ncu-report")
    if not os.path.isfile(path):
        sys.exit(f"{path}: no such report (ncu writes NAME.ncu-rep for -o NAME)")
    action = ncu_report.load_report(path).range_by_idx(0).action_by_idx(0)
    total = action.metric_by_name("smsp__pcsamp_sample_count")
    if total is None:
        sys.exit(
            f"{path} has no PC samples: profile with "
            "--section WarpStateStats --section SourceCounters"
        )
    reasons = [
        name
        for name in action.metric_names()
        if name.startswith(PREFIX) and not name.endswith("_not_issued")
    ]
    metrics = {name[len(PREFIX):]: action.metric_by_name(name) for name in reasons}
    pcs = total.correlation_ids()
    samples = []
    for i in range(total.num_instances()):
        pc = pcs.as_uint64(i)
        info = action.source_info(pc)
        where = (info.file_name(), info.line()) if info else ("?", 0)
        why = collections.Counter({r: m.as_uint64(i) for r, m in metrics.items()})
        samples.append((total.as_uint64(i), why, where))
    return action.name(), samples


def function_extents(lines):
    """(first line, last line, name) of each function or lambda in CUDA source.

    A definition runs from its first line to the brace that closes its
    body; a line belongs to the innermost definition around it (so a lambda's
    lines to the lambda, the rest of the kernel to the kernel). A
    declaration is no definition.

    >>> source = [
    ...     "__device__ void helper(int);  // declared only",
    ...     "__device__ __forceinline__ int twice(int x) {",
    ...     "  auto add = [&](int y) {",
    ...     "    return x + y;",
    ...     "  };",
    ...     "  return add(x);",
    ...     "}",
    ...     'extern "C" __global__ void __launch_bounds__(64, 1) kernel(int* out) {',
    ...     "  *out = twice(1);",
    ...     "}",
    ... ]
    >>> extents = function_extents(source)
    >>> extents
    [(2, 7, 'twice'), (3, 5, 'add (lambda)'), (8, 10, 'kernel')]
    >>> [enclosing(extents, line) for line in (1, 4, 6, 9)]
    ['?', 'add (lambda)', 'twice', 'kernel']
    """
    pattern = re.compile(r'\s*(?:extern "C"\s+)?(?:__device__|__global__)[^(;]*?(\w+)\s*\(')
    lambda_pattern = re.compile(r"\s*auto (\w+) = \[")
    code = [re.sub(r"//.*|__launch_bounds__\([^)]*\)", "", text) for text in lines]
    extents = []
    for number, text in enumerate(code, 1):
        if m := pattern.match(text):
            name = m.group(1)
        elif m := lambda_pattern.match(text):
            name = f"{m.group(1)} (lambda)"
        else:
            continue
        depth, opened = 0, False
        for last in range(number, len(code) + 1):
            for ch in code[last - 1]:
                if ch == "{":
                    depth, opened = depth + 1, True
                elif ch == "}":
                    depth -= 1
            if opened and depth <= 0:
                break
            if not opened and code[last - 1].rstrip().endswith(";"):
                break  # a declaration, not a definition
        if opened:
            extents.append((number, last, name))
    return extents


def enclosing(extents, line):
    inside = [(first, name) for first, last, name in extents if first <= line <= last]
    return max(inside)[1] if inside else "?"


def top(counter, total, n=3):
    return ", ".join(f"{r} {v / total:.0%}" for r, v in counter.most_common(n) if v)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="an .ncu-rep file with PC samples")
    parser.add_argument("--source", help="the CUDA source the kernel was compiled from")
    parser.add_argument("--lines", type=int, default=25, help="source lines to list")
    args = parser.parse_args()

    kernel, samples = load_samples(args.report)
    grand = sum(n for n, _, _ in samples)
    if grand == 0:
        sys.exit(f"{args.report}: the kernel was sampled 0 times")
    reasons = collections.Counter()
    for _, why, _ in samples:
        reasons.update(why)
    print(f"{kernel}: {grand} samples")
    print("stall reasons: " + top(reasons, grand, 8))

    by_line = collections.defaultdict(lambda: [0, collections.Counter()])
    for n, why, where in samples:
        by_line[where][0] += n
        by_line[where][1].update(why)

    if args.source:
        with open(args.source) as f:
            extents = function_extents(f.read().splitlines())
        by_function = collections.defaultdict(lambda: [0, collections.Counter()])
        for (_, line), (n, why) in by_line.items():
            entry = by_function[enclosing(extents, line)]
            entry[0] += n
            entry[1].update(why)
        print("\nby function (inlined code counts where its source is)")
        for name, (n, why) in sorted(by_function.items(), key=lambda kv: -kv[1][0]):
            if n >= grand * 0.005:
                print(f"  {name:28s} {n:6d} {n / grand:6.1%}  {top(why, n)}")

    print(f"\nby source line (the {args.lines} most sampled)")
    for (file, line), (n, why) in sorted(by_line.items(), key=lambda kv: -kv[1][0])[: args.lines]:
        print(f"  {file.split('/')[-1]}:{line:<5d} {n:6d} {n / grand:6.1%}  {top(why, n)}")


if __name__ == "__main__":
    main()
