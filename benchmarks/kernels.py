"""Exact mode's integer kernels, timed per element: the int64 forms against the float64 forms that
int32 words with ``q <= 2**19`` use, beside the float update.

One layer's update (`step`, `step_narrow`) and its inverse (`unstep_velocity`,
`unstep_velocity_narrow`) of exact mode, compiled, on a state of ``2**20`` elements in int32
words with a one-byte buffer at gamma 0.9, on one grid and (the update) on a grid per row, as the
default grid places it (``2**20 / 256`` rows of 256, a token's or channel's, each its own step),
and the update and its inverse on a grid that moves (`step_moving`, `unstep_velocity_moving`,
an int32 buffer, no row moving);
one layer of the backward, the
inverse and ``x_{n-1}``'s float, with ``x`` in its word (`unstep_velocity_narrow`, `convert`) and
as a float32 and an int8 correction (`unstep_velocity_only`, `unstep_split`); and the float
update of float mode (eager: four operations; fused: `momentum_update`, one compiled pass), on
one thread, interleaved, median of the repeats.

Writes benchmarks/results/kernels.{csv,md}. About a minute on a CPU.

    python benchmarks/kernels.py            # the committed results
    python benchmarks/kernels.py --quick    # seconds: 2**16 elements (kernels_quick.*)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from inertia._core import kernels
from inertia.bench import environment, write_dict_rows

RESULTS = Path(__file__).parent / "results"


def cases(n: int) -> dict[str, Callable[[], object]]:
    """The timed calls, each on its own tensors of ``n`` elements."""
    gen = torch.Generator().manual_seed(0)

    def state() -> tuple[torch.Tensor, ...]:
        x, v = (torch.randint(-(2**20), 2**20, (1, n), generator=gen).int() for _ in "xv")
        buffer = torch.randint(0, 20, (1, n), generator=gen).to(torch.uint8)
        return x, v, buffer, torch.randn(1, n, generator=gen)

    p, q = torch.tensor(9), torch.tensor(10)
    c = torch.full((1, 1), 2.0**20 * 0.1, dtype=torch.float64)
    inv = torch.full((1, 1), 2.0**-20, dtype=torch.float64)
    runs: dict[str, Callable[[], object]] = {}
    for name, kernel, rest in (
        ("exact update, int64 form", kernels.step, (p, q, c, inv, torch.float32)),
        ("exact update, float64 form", kernels.step_narrow, (p, q, c, inv, torch.float32)),
        ("exact inverse, int64 form", kernels.unstep_velocity, (p, q, c)),
        ("exact inverse, float64 form", kernels.unstep_velocity_narrow, (p, q, c)),
    ):
        args = (*state(), *rest)
        runs[name] = lambda kernel=kernel, args=args: kernel(*args)
    # A grid per row of 256 elements: the kernels see (rows, 256) and per-row constants.
    rows = n // 256
    steps = 2.0 ** torch.randint(16, 24, (rows, 1), generator=gen, dtype=torch.float64)
    for name, kernel in (
        ("exact update, int64 form, a grid per row", kernels.step),
        ("exact update, float64 form, a grid per row", kernels.step_narrow),
    ):
        args = (*(t.reshape(rows, 256) for t in state()), p, q, steps * 0.1, 1 / steps)
        runs[name] = lambda kernel=kernel, args=args: kernel(*args, torch.float32)
    # A grid that moves (an int32 buffer), with no row moving: the same work whatever the shifts.
    ahead, behind = ([t.reshape(rows, 256) for t in state()] for _ in "ab")
    ahead[2], behind[2] = ahead[2].int(), behind[2].int()
    ones = torch.ones((rows, 1), dtype=torch.float64)
    runs["exact update, moving grid, a grid per row"] = lambda: kernels.step_moving(
        *ahead, p, q, steps * 0.1, 1 / steps, torch.float32
    )
    runs["exact inverse, moving grid, a grid per row"] = lambda: kernels.unstep_velocity_moving(
        *behind, p, q, steps * 0.1, ones, ones
    )
    # One layer of the backward: the inverse and x_{n-1}'s float, with x in its word and with x
    # as a float32 and an int8 correction.
    scale = torch.full((1, 1), 2.0**20, dtype=torch.float64)
    word_x, word_v, word_buffer, word_f = state()
    split_v, split_buffer, split_f = state()[1:]
    position = kernels.convert(word_x, inv, torch.float32)
    correction = kernels.correction(word_x, position, scale)

    def word() -> object:
        kernels.unstep_velocity_narrow(word_x, word_v, word_buffer, word_f, p, q, c)
        return kernels.convert(word_x, inv, torch.float32)

    def split() -> object:
        kernels.unstep_velocity_only(split_v, split_buffer, split_f, p, q, c)
        return kernels.unstep_split(position, correction, split_v, scale, inv)

    runs["exact inverse and x's float, x in its word"] = word
    runs["exact inverse and x's float, x split"] = split
    x, v, out = (torch.randn(n, generator=gen) for _ in "xvo")
    gamma, rest = torch.tensor(0.9), torch.tensor(1 - 0.9)

    def eager() -> object:
        f = out - x
        new_v = 0.9 * v + (1 - 0.9) * f
        return x + new_v, new_v

    runs["float update, eager"] = eager
    runs["float update, fused"] = lambda: kernels.momentum_update(x, v, out, gamma, rest, True)
    return runs


def measure(n: int, repeats: int) -> list[dict[str, object]]:
    runs = cases(n)
    for run in runs.values():
        run()  # warm-up and compilation
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return [
        {"kernel": name, "elements": n, "ns_per_element": round(statistics.median(t) / n * 1e9, 2)}
        for name, t in times.items()
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2**16 elements, 3 repeats")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n, repeats = (1 << 16, 3) if args.quick else (1 << 20, 15)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = measure(n, repeats)
        measured_on = environment()
    finally:
        torch.set_num_threads(before)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_quick" if args.quick else "kernels"
    write_dict_rows(rows, args.out / f"{stem}.csv")
    command = "python benchmarks/kernels.py" + (" --quick" if args.quick else "")
    lines = [
        f"Produced by `{command}` ({measured_on}).",
        "",
        f"A state of {n:,} elements: int32 words and a one-byte buffer at gamma 0.9 for exact "
        "mode's kernels (compiled), on one grid unless a grid per row (rows of 256) is named, "
        "float32 for the float update; median of the interleaved repeats.",
        "",
        "| kernel | ns per element |",
        "|---|---|",
        *(f"| {r['kernel']} | {r['ns_per_element']} |" for r in rows),
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    summary = ", ".join(f"{r['kernel']} {r['ns_per_element']}" for r in rows)
    print(f"kernels: ns per element: {summary}", file=sys.stderr)


if __name__ == "__main__":
    main()
