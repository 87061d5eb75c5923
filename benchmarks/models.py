"""Converted real models: bytes saved for backward and step time, against the original model and
against torch.utils.checkpoint on every block, side by side in one run.

Writes benchmarks/results/models.{csv,md}. About 5 minutes on 2 CPU cores.

    python benchmarks/models.py
    python benchmarks/models.py --quick     # resnet18 and a 2-layer encoder, small inputs

The true peak of a step of converted models (parameter gradients and temporaries included) is
measured by benchmarks/true_peak.py, with the same inertia.bench.true_peak as everything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inertia.bench import ModelBenchConfig, run_models, write_csv, write_markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    config = (
        ModelBenchConfig(
            models=("resnet18", "transformer2"),
            image_size=32,
            image_batch=8,
            seq_len=16,
            seq_batch=4,
            repeats=2,
        )
        if args.quick
        else ModelBenchConfig()
    )
    rows = run_models(config, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "models_quick" if args.quick else "models"
    write_csv(rows, args.out / f"{stem}.csv")
    command = "python benchmarks/models.py" + (" --quick" if args.quick else "")
    description = (
        f"torchvision ResNets (batch {config.image_batch}, {config.image_size}x"
        f"{config.image_size}, train mode) and nn.TransformerEncoder (d_model 256, 4 heads, "
        f"batch {config.seq_batch}, sequence {config.seq_len}, dropout 0.1), gamma "
        f"{config.gamma}; checkpoint: every block of the converted stacks; momentum_exact: "
        "transform_to_momentumnet with its defaults (memory-free, exact arithmetic; ResNets keep "
        "the first block of each stage, momentum_exact_ckpt_stem_first checkpoints it and the "
        "stem); momentum_free: the same with exact=False (float arithmetic); time: median of "
        f"{config.repeats} interleaved steps [min-max]."
    )
    write_markdown(rows, args.out / f"{stem}.md", command, description)
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
