"""Activations saved for backward kept in bf16: the larger half of a CPU fp32 step's memory, halved.

Backward needs many of the forward pass's intermediate tensors; autograd keeps them until then,
and on a 512-token step of flan-t5-small they are most of what the step adds to the process. Through
`torch.autograd.graph.saved_tensors_hooks` each large fp32 activation is stored as bf16 and turned
back into fp32 when backward reads it. Weights are never copied (they are the parameters
themselves), the forward pass and every matrix multiply still run in fp32, and only the gradients
see activations rounded to bf16's 8 significant bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# Smaller tensors stay as they are: the saving would not pay for the copies.
MIN_ELEMENTS = 65_536


@contextlib.contextmanager
def bf16_saved_activations(model: Any) -> Iterator[None]:
    """While inside, autograd keeps large fp32 activations of `model`'s forward pass in bf16."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> Any:
        if (
            tensor.dtype == torch.float32
            and tensor.numel() >= MIN_ELEMENTS
            and tensor.untyped_storage().data_ptr() not in parameters
        ):
            return _Packed(tensor.to(torch.bfloat16))
        return tensor

    def unpack(saved: Any) -> torch.Tensor:
        return saved.tensor.float() if isinstance(saved, _Packed) else saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Packed:
    """A bf16 copy of a saved fp32 activation (a class of its own, so no saved value is mistaken for one)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
