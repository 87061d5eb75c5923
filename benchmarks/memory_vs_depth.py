"""Bytes saved for backward and step time against depth: plain, checkpointing, momentum.

Writes benchmarks/results/memory_vs_depth.{csv,md,png,pdf}. Full run on 2 CPU threads: about
8 minutes.

    python benchmarks/memory_vs_depth.py            # the committed results
    python benchmarks/memory_vs_depth.py --quick    # a one-minute smoke run
    python benchmarks/memory_vs_depth.py --true-peak  # and each step's true peak
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from inertia.bench import BenchConfig, describe, run, write_csv, write_markdown
from inertia.plots import plot_bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--true-peak", action="store_true",
                        help="each step's true peak too (inertia.bench.true_peak)")  # fmt: skip
    args = parser.parse_args(argv)
    config = (
        BenchConfig(depths=(4, 16), width=64, batch=32, repeats=3) if args.quick else BenchConfig()
    )
    config = replace(config, true_peak=args.true_peak)
    rows = run(config, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "memory_vs_depth_quick" if args.quick else "memory_vs_depth"
    write_csv(rows, args.out / f"{stem}.csv")
    command = "python benchmarks/memory_vs_depth.py" + (" --quick" if args.quick else "")
    command += " --true-peak" if args.true_peak else ""
    write_markdown(rows, args.out / f"{stem}.md", command, describe(config))
    plot_bench(args.out / f"{stem}.csv")  # the README's figure
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
