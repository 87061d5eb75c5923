"""``python -m inertia.bench``: the fresh process in which `inertia.bench.true_peak` measures one
case (and `inertia.bench.time_variants` times them); not a command for users."""

import sys

from ._fresh import _child

if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
