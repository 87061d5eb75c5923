"""transform_to_momentumnet on torch.nn.Transformer stacks: masks reach every layer, causality."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from inertia import InertiaError, MomentumLayerList, MomentumNet, transform_to_momentumnet
from inertia.testing import TOLERANCES, assert_gradients_match, relative_error

D, HEADS, S, T, B = 16, 2, 7, 5, 3
F64 = torch.float64


def make_transformer(batch_first: bool, dropout: float = 0.1) -> nn.Transformer:
    return nn.Transformer(
        d_model=D,
        nhead=HEADS,
        num_encoder_layers=3,
        num_decoder_layers=3,
        dim_feedforward=32,
        dropout=dropout,
        batch_first=batch_first,
    ).double()


def convert(model: nn.Module, **kwargs: object) -> nn.Module:
    options: dict[str, object] = {"keep_first_layer": False, "gamma": 0.9, **kwargs}
    return transform_to_momentumnet(model, ["encoder.layers", "decoder.layers"], **options)  # type: ignore[arg-type]


def inputs(batch_first: bool) -> dict[str, Tensor]:
    src = torch.randn(B, S, D, dtype=F64) if batch_first else torch.randn(S, B, D, dtype=F64)
    tgt = torch.randn(B, T, D, dtype=F64) if batch_first else torch.randn(T, B, D, dtype=F64)
    src_pad = torch.zeros(B, S, dtype=torch.bool)
    src_pad[0, -2:] = True  # the first sequence is two tokens shorter
    return {
        "src": src.requires_grad_(),
        "tgt": tgt.requires_grad_(),
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(T, dtype=F64),
        "src_key_padding_mask": src_pad,
        "memory_key_padding_mask": src_pad,
    }


class Call(nn.Module):
    """Calls a transformer with keyword inputs (so gradient_errors can pass them positionally)."""

    def __init__(self, model: nn.Module, batch_first: bool) -> None:
        super().__init__()
        self.model, self.batch_first = model, batch_first

    def forward(self, src: Tensor, tgt: Tensor, tgt_mask: Tensor, pad: Tensor) -> Tensor:
        return self.model(  # type: ignore[no-any-return]
            src,
            tgt,
            tgt_mask=tgt_mask,
            tgt_is_causal=True,
            src_key_padding_mask=pad,
            memory_key_padding_mask=pad,
        )


@pytest.mark.parametrize("batch_first", [True, False])
def test_structure_and_weights(batch_first: bool) -> None:
    model = make_transformer(batch_first)
    converted = convert(model)
    assert isinstance(converted.encoder.layers, MomentumLayerList)
    assert len(converted.decoder.layers) == 3
    assert converted.decoder.layers[1] is not model.decoder.layers[1]  # a deep copy
    assert type(converted.decoder.layers[1]) is nn.TransformerDecoderLayer
    assert list(converted.state_dict()) == list(model.state_dict())
    model.load_state_dict(converted.state_dict(), strict=True)
    converted.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_gamma_zero_is_the_original(batch_first: bool, train: bool) -> None:
    model = make_transformer(batch_first).train(train)
    converted = convert(model, gamma=0.0, use_backprop=True).train(train)
    kw = inputs(batch_first)
    args = (kw["src"], kw["tgt"], kw["tgt_mask"], kw["src_key_padding_mask"])
    torch.manual_seed(1)
    expected = Call(model, batch_first)(*args)
    torch.manual_seed(1)
    got = Call(converted, batch_first)(*args)
    assert relative_error(got, expected) <= TOLERANCES[F64]


def momentum_layers(layers: nn.ModuleList, x: Tensor, gamma: float, **kw: object) -> Tensor:
    v = torch.zeros_like(x)
    for layer in layers:
        v = gamma * v + (1 - gamma) * (layer(x, **kw) - x)
        x = x + v
    return x


@pytest.mark.parametrize("batch_first", [True, False])
def test_gamma_point_nine_is_a_momentum_loop(batch_first: bool) -> None:
    """Train mode, dropout on: the converted model is the momentum loop over the same layers."""
    model = make_transformer(batch_first).train()
    converted = convert(model, use_backprop=True)
    kw = inputs(batch_first)
    pad, tgt_mask = kw["src_key_padding_mask"], kw["tgt_mask"]
    torch.manual_seed(2)
    memory = model.encoder.norm(
        momentum_layers(model.encoder.layers, kw["src"], 0.9, src_key_padding_mask=pad)
    )
    expected = model.decoder.norm(
        momentum_layers(
            model.decoder.layers,
            kw["tgt"],
            0.9,
            memory=memory,
            tgt_mask=tgt_mask,
            tgt_is_causal=True,
            memory_key_padding_mask=pad,
        )
    )
    torch.manual_seed(2)
    got = Call(converted, batch_first)(kw["src"], kw["tgt"], tgt_mask, pad)
    assert relative_error(got, expected) <= TOLERANCES[F64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_first", [True, False])
def test_memory_free_gradients_match(batch_first: bool, dtype: torch.dtype) -> None:
    model = make_transformer(batch_first).to(dtype).train()
    backprop = Call(convert(model, use_backprop=True), batch_first)
    free = Call(convert(model, use_backprop=False), batch_first)
    kw = inputs(batch_first)
    args = [kw["src"].to(dtype), kw["tgt"].to(dtype), kw["tgt_mask"].to(dtype)]
    errors = assert_gradients_match(
        backprop,
        free,
        *[a.detach().requires_grad_(a.dtype.is_floating_point) for a in args],
        kw["src_key_padding_mask"],
        seed=3,
    )
    assert errors["input.0"] <= TOLERANCES[dtype]  # the encoder input, through the memory


@pytest.mark.parametrize("use_backprop", [True, False])
def test_causal_decoder_stays_causal(use_backprop: bool) -> None:
    """Output t depends on no target token after t, in value and in gradient."""
    model = convert(make_transformer(True, dropout=0.0), use_backprop=use_backprop)
    kw = inputs(True)
    call = Call(model, True)
    out = call(kw["src"], kw["tgt"], kw["tgt_mask"], kw["src_key_padding_mask"])
    changed = kw["tgt"].detach().clone()
    changed[:, 3:] += 1.0  # future tokens for positions 0..2
    out2 = call(kw["src"], changed, kw["tgt_mask"], kw["src_key_padding_mask"])
    assert torch.equal(out[:, :3], out2[:, :3])
    assert not torch.allclose(out[:, 3:], out2[:, 3:])
    out[:, :3].square().sum().backward()  # not .sum(): the final LayerNorm's outputs sum to 0
    assert kw["tgt"].grad is not None
    assert torch.all(kw["tgt"].grad[:, 3:] == 0)
    assert torch.any(kw["tgt"].grad[:, :3] != 0)


@pytest.mark.parametrize("train", [True, False])
def test_padding_mask_reaches_every_layer(train: bool) -> None:
    model = make_transformer(True, dropout=0.0)
    encoder = transform_to_momentumnet(
        model.encoder, "layers", keep_first_layer=False, method="memory_free"
    ).train(train)
    src = torch.randn(B, S, D, dtype=F64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[:, -2:] = True
    out = encoder(src, src_key_padding_mask=pad)
    noisy = src.clone()
    noisy[:, -2:] = torch.randn(B, 2, D, dtype=F64)  # change only the padded tokens
    out2 = encoder(noisy, src_key_padding_mask=pad)
    assert relative_error(out2[:, :-2], out[:, :-2]) < 1e-14


def test_parent_loop_that_changes_arguments_is_refused() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x: Tensor) -> Tensor:
            for layer in self.layers:
                x = layer(x) * 2  # something between layers
            return x

    converted = transform_to_momentumnet(Odd(), "layers", keep_first_layer=False)
    with pytest.raises(InertiaError, match="layer 1 another input"):
        converted(torch.randn(2, 4))


def test_cache_objects_are_dropped_in_memory_free_training() -> None:
    """A cache would be updated twice (forward and recomputation): memory-free training runs the
    blocks without it after a warning; generation (no backward) passes it through."""

    class Cache:
        def update(self) -> None: ...

        def get_seq_length(self) -> int:
            return 0

    seen: list[object] = []

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Tensor, cache: object = None) -> Tensor:
            seen.append(cache)
            return self.lin(x)

    net = MomentumNet([Block(), Block()], 0.9, use_backprop=False)
    cache = Cache()
    with pytest.warns(UserWarning, match="use_cache=False"):
        out = net(torch.randn(2, 4), cache=cache)
    out.sum().backward()
    assert seen == [None] * 4  # forward and recomputation of both blocks
    seen.clear()
    with torch.no_grad():
        net(torch.randn(2, 4), cache=cache)  # generation: no backward, no recomputation
    assert seen == [cache, cache]


class TupleLayer(nn.Module):
    """Like HuggingFace layers before transformers 5: returns (hidden, attention weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return h + torch.tanh(self.lin(h)) * mask, mask.sum()


class TupleEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TupleLayer() for _ in range(3))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layer:
            h = layer(h, mask)[0]
        return h


@pytest.mark.parametrize("use_backprop", [True, False])
def test_layers_returning_tuples(use_backprop: bool) -> None:
    model = TupleEncoder().double()
    converted = transform_to_momentumnet(
        model, "layer", keep_first_layer=False, use_backprop=use_backprop, method="memory_free"
    )
    backprop = transform_to_momentumnet(model, "layer", keep_first_layer=False, use_backprop=True)
    h = torch.randn(2, 4, dtype=F64, requires_grad=True)
    mask = torch.ones(2, 1, dtype=F64)
    out = converted(h, mask)
    assert out.shape == (2, 4)  # not the first row of the batch: the stack returned (x_N,)
    expected = h
    v = torch.zeros_like(h)
    for layer in model.layer:
        v = 0.9 * v + (1 - 0.9) * (layer(expected, mask)[0] - expected)
        expected = expected + v
    assert relative_error(out, expected) <= TOLERANCES[F64]
    assert_gradients_match(backprop, converted, h, mask)
    with pytest.raises(InertiaError, match=r"block 0 \(TupleLayer\) returned tuple"):
        MomentumNet(list(model.layer), 0.9)(h, mask)  # a plain MomentumNet stays strict
