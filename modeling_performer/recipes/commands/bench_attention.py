"""Time and peak memory of attention forward+backward: FAVOR+ (ours) vs torch SDPA vs
performer-pytorch (when installed), B=1, H=8, D=64, M=256, all measured in this run.

Each (method, length) runs in a fresh subprocess so that its peak resident memory is its own.
glibc's mmap/trim thresholds are raised for those processes: otherwise page faults from
returning and re-faulting large buffers dominate CPU timings on small machines.

    python scripts/bench_attention.py                      # T = 1k .. 32k
    python scripts/bench_attention.py --lengths 1024 4096 --repeats 3
"""

import argparse
import json

from modeling_performer.recipes.attention_timing import (
    LINEAR_METHODS,
    METHODS,
    measure,
    performer_pytorch_available,
    run_worker,
)
from modeling_performer.recipes.bench_common import add_output_arguments, save_and_draw

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (median), after one warm-up")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + LINEAR_METHODS)
    parser.add_argument("--window", type=int, default=64, help="local window of the *-window methods")
    parser.add_argument("--max-sdpa-length", type=int, default=32768)
    parser.add_argument("--max-performer-pytorch-length", type=int, default=8192,
                        help="its causal CPU path keeps a [T, M, D] tensor per head: longer runs exhaust memory")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point")
    add_output_arguments(parser, "attention")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), args.repeats, window=args.window)))
        return

    methods = [m for m in args.methods if not m.startswith("performer-pytorch") or performer_pytorch_available()]
    if len(methods) < len(args.methods):
        print("performer-pytorch is not installed (pip install performer-pytorch==1.1.4): skipping it")
    results = {}
    header = f"{'T':>6} " + " ".join(f"{m:>26}" for m in methods)
    print("forward+backward, B=1 H=8 D=64 M=256; each cell: median seconds / peak MiB")
    print(header, flush=True)
    for length in args.lengths:
        row = {}
        for method in methods:
            if (method.startswith("sdpa") and length > args.max_sdpa_length) or (
                method.startswith("performer-pytorch") and length > args.max_performer_pytorch_length
            ):
                row[method] = {"error": "skipped"}
                continue
            repeats = args.repeats if length <= 8192 else max(1, args.repeats - 1)
            row[method] = run_worker(method, length, repeats, args.timeout)
        results[length] = row
        cells = []
        for method in methods:
            r = row[method]
            cells.append(f"{r['error']:>26}" if "error" in r else f"{r['seconds']:>15.3f} s {r['peak_bytes'] / 2**20:>7.0f} MiB")
        print(f"{length:>6} " + " ".join(cells), flush=True)

    print("\nRatios (same run):")
    for length, row in results.items():
        parts = []
        for ours, other in [("favor-causal", "performer-pytorch-causal"), ("favor", "performer-pytorch"),
                            ("favor-causal", "sdpa-causal"), ("favor", "sdpa")]:
            a, b = row.get(ours, {}), row.get(other, {})
            if "seconds" in a and "seconds" in b:
                parts.append(f"{other}/{ours}: time x{b['seconds'] / a['seconds']:.2f}, "
                             f"memory x{b['peak_bytes'] / max(a['peak_bytes'], 1):.2f}")
        print(f"  T={length}: " + "; ".join(parts))
    for length, row in results.items():  # what the decay gate costs its kernel
        for gated in [m for m in row if "-decay" in m and "seconds" in row[m]]:
            plain = row.get(gated.replace("-decay", ""), {})
            if "seconds" in plain:
                print(f"  T={length}: {gated} / {gated.replace('-decay', '')}: time x"
                      f"{row[gated]['seconds'] / plain['seconds']:.2f}")
    for ours, other in [("favor-causal", "sdpa-causal"), ("favor", "sdpa")]:
        faster = [t for t, row in results.items() if "seconds" in row.get(ours, {}) and "seconds" in row.get(other, {})
                  and row[ours]["seconds"] < row[other]["seconds"]]
        print(f"  {ours} faster than {other} from T={min(faster) if faster else 'never (in this range)'}")
    for method in ("favor", "favor-causal"):
        points = [(t, row[method]["peak_bytes"]) for t, row in results.items() if "peak_bytes" in row.get(method, {})]
        if len(points) >= 2:
            (t0, m0), (t1, m1) = points[0], points[-1]
            print(f"  {method}: peak memory {(m1 - m0) / (t1 - t0) / 1024:.1f} KiB per token "
                  f"(slope between T={t0} and T={t1})")
    save_and_draw("attention", args, {"results": results})


if __name__ == "__main__":
    main()
