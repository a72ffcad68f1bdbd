"""Saved activations in bf16: the same gradients within bf16 rounding, and no weight copied."""

from __future__ import annotations

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
