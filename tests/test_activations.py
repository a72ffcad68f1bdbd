"""bf16 for CPU training: saved activations within bf16 rounding, no weight copied; frozen weights copied once."""

from __future__ import annotations

import contextlib
import math

import pytest

torch = pytest.importorskip("torch")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.GELU(), torch.nn.Linear(384, 256))
    model[0].weight.requires_grad_(False)  # frozen, as a LoRA base is
    return model


def test_gradients_match_fp32_within_bf16_rounding_and_weights_are_not_copied() -> None:
    from homeiq_trainer.training import activations

    x = torch.randn(300, 256)  # activations of 76,800 and 115,200 elements; weights of 98,304
    exact_model, packed_model = _model(), _model()
    exact_model(x).square().mean().backward()
    packed: list[torch.Tensor] = []
    original = activations._Packed.__init__

    def record(self: object, tensor: torch.Tensor) -> None:
        packed.append(tensor)
        original(self, tensor)  # type: ignore[arg-type]

    activations._Packed.__init__ = record  # type: ignore[method-assign]
    try:
        with activations.bf16_saved_activations(packed_model):
            loss = packed_model(x).square().mean()
        loss.backward()
    finally:
        activations._Packed.__init__ = original  # type: ignore[method-assign]
    assert len(packed) >= 3 and all(t.dtype == torch.bfloat16 for t in packed)  # what backward reads, all as bf16
    weight_sizes = {p.numel() for p in packed_model.parameters()}
    assert not any(t.numel() in weight_sizes for t in packed)  # activations only
    for exact, approx in zip(exact_model.parameters(), packed_model.parameters(), strict=True):
        if exact.grad is None:
            assert approx.grad is None
            continue
        relative = (approx.grad - exact.grad).norm() / exact.grad.norm()
        assert 0 < relative < 0.02  # rounded (so the hook ran), yet the same gradient


def test_frozen_bf16_copies_compute_exactly_what_autocast_would_and_give_the_fp32_weights_back() -> None:
    from homeiq_trainer.training.frozen_bf16 import FrozenBf16Weights

    model = _model()  # its first layer frozen, its last trainable (as LoRA's are)
    frozen, trainable = model[0], model[2]
    full_weight = frozen.weight
    x = torch.randn(64, 256)

    def gradients(shadow: FrozenBf16Weights | None) -> list[torch.Tensor]:
        model.zero_grad()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            if shadow is not None:
                stack.enter_context(shadow.swapped_in())
                assert frozen.weight.dtype == torch.bfloat16 and trainable.weight.dtype == torch.float32
            loss = model(x).float().square().mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    autocast_only = gradients(None)
    shadow = FrozenBf16Weights([model, frozen])  # a layer reachable twice is copied once
    assert len(shadow) == 1
    with_copies = gradients(shadow)
    # The same bf16 values autocast would have cast, so the very same gradients.
    assert len(with_copies) == len(autocast_only) == 3
    for a, b in zip(with_copies, autocast_only, strict=True):
        assert torch.equal(a, b)
    assert frozen.weight is full_weight and frozen.weight.dtype == torch.float32
    # Swapped back even when the forward pass fails.
    with pytest.raises(RuntimeError), shadow.swapped_in():
        model(torch.randn(4, 3))
    assert frozen.weight is full_weight


def test_rounded_up_rows_multiply_few_shapes_and_give_the_same_numbers() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from homeiq_trainer.training.row_buckets import RowRounding

    multiplies = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}

    class RowCounts(TorchDispatchMode):
        """Rows of the left operand of every matrix multiply, forward and backward."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func in multiplies:
                self.rows.append(args[-2].shape[0])
            return func(*args, **(kwargs or {}))

    model = _model()
    model[2].weight.requires_grad_(False)  # both frozen: a trainable layer (LoRA's) is left alone
    rounding = RowRounding([model, model[0]], 16)
    assert len(rounding) == 2  # a layer reachable twice is hooked once
    assert len(RowRounding([_model()], 16)) == 1

    def run(x: torch.Tensor, rounded: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        model.zero_grad()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            if rounded:
                stack.enter_context(rounding.applied())
            counts = stack.enter_context(RowCounts())
            out = model(x)
            out.float().square().mean().backward()
        assert out.shape == (*x.shape[:-1], 256)
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], counts.rows

    plain_rows_of_21 = run(torch.randn(3, 7, 256), False)[2]
    assert 21 in plain_rows_of_21
    for lead in ((3, 7), (5, 13), (64,)):
        x = torch.randn(*lead, 256)
        plain_out, plain_grads, plain_rows = run(x, False)  # hooked, but outside `applied`
        out, grads, rows = run(x, True)
        # Every multiply of activations (forward, and backward's input gradients) ran on a multiple of 16
        # rows; a weight gradient's multiply has the weight's rows.
        activation_rows = [r for r in rows if r not in (256, 384)]
        assert activation_rows and all(r % 16 == 0 for r in activation_rows)
        if math.prod(lead) % 16:
            assert plain_rows != rows  # without it, the odd row count itself
        # Zero rows change no other row and add nothing to a weight gradient: the same numbers.
        torch.testing.assert_close(out, plain_out, rtol=1e-2, atol=1e-2)
        assert len(grads) == len(plain_grads) == 2  # the biases
        for a, b in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    # A call that fails between the two hooks leaves nothing behind for the next call of that layer.
    with rounding.applied():
        with pytest.raises(RuntimeError):
            model[0](torch.randn(3, 5, 7))  # 15 rows, padded, then the multiply fails
        assert model[0](torch.randn(2, 16, 256)).shape == (2, 16, 384)  # 32 rows: no padding, no cut
    # Inactive again when the block ends, also when the forward pass fails inside it.
    with pytest.raises(RuntimeError), rounding.applied():
        model(torch.randn(4, 3))
    assert run(torch.randn(3, 7, 256), False)[2] == plain_rows_of_21


def test_adapter_layers_compute_in_fp32_under_autocast_and_as_before_outside_it() -> None:
    from homeiq_trainer.training.frozen_bf16 import fp32_adapter_layers

    model = _model()  # its first layer frozen, its last trainable (as LoRA's are)
    x = torch.randn(64, 256)
    reference = model(x)
    assert fp32_adapter_layers([model, model[2]]) == 1  # the trainable one, once
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model[1](model[0](x))
        out = model[2](hidden)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32  # autocast would give bf16
    assert torch.equal(out, torch.nn.functional.linear(hidden.float(), model[2].weight, model[2].bias))
    out.square().mean().backward()
    assert model[2].weight.grad is not None and model[2].weight.grad.dtype == torch.float32
    assert torch.equal(model(x), reference)  # outside autocast nothing changed
