"""``python -m inertia``: the same as the ``inertia`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
