"""Throughput against batch size and CPU threads (README, Speed: the scaling table).

    python benchmarks/scaling.py                                  # LeViT-128S and -384, eager fp32
    python benchmarks/scaling.py --backend openvino --output scaling.csv
    python benchmarks/scaling.py --models levit_128s --batches 1,16 --threads 1

Prints a markdown table: one row per (model, threads), one column per batch size (img/s, the
median over timed windows, as `levit bench` measures it).
"""

from __future__ import annotations

import argparse
import sys

from levit.paper.speed import benchmark_one, device_name, write_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="levit_128s,levit_384")
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--window", type=float, default=1.0)
    ap.add_argument("--output", default=None, help="also write the rows as .csv or .json")
    args = ap.parse_args()
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for m in models:
        for t in threads:
            for b in batches:
                print(f"{m} threads={t} batch={b} ...", end="", file=sys.stderr, flush=True)
                r = benchmark_one(
                    m,
                    backend=args.backend,
                    precision=args.precision,
                    batch_size=b,
                    threads=t,
                    warmup_s=args.warmup,
                    windows=args.windows,
                    window_s=args.window,
                )
                print(f" {r['img_s']:.1f} img/s", file=sys.stderr)
                rows.append(r)
    print(
        f"\n{device_name()}, backend {rows[0]['backend']}, {args.precision}; img/s (median of {args.windows} windows)\n"
    )
    print("| model | threads | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for m in models:
        for t in threads:
            cells = [f"{r['img_s']:.1f}" for r in rows if r["model"] == m and r["threads"] == t]
            print(f"| {m} | {t} | " + " | ".join(cells) + " |")
    if args.output:
        write_rows(rows, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
