"""bf16 linear layers on a CPU multiply a row count rounded up to a multiple, so few shapes ever occur.

oneDNN, which runs torch's bf16 matrix multiplies on a CPU, builds a kernel for every new shape and
keeps it (about 0.5 MiB each, up to its cache's 1,024). A linear layer multiplies batch × length
rows, and token-budget batches bring hundreds of row counts to every layer, forward and backward:
a 2,000-example bf16 run on a Zen 5 EPYC peaked at 995-1,012 MiB of anonymous memory against fp32's
538. While `RowRounding.applied`, each frozen plain `nn.Linear` flattens its input to rows, adds zero rows up
to the multiple, multiplies, and drops them again: the same numbers up to bf16 rounding (a zero
row changes no other row, nor any weight gradient; another row count may get another kernel), from
far fewer kernels. Rounded to 32 rows that run peaked at 805-818 MiB of anonymous memory in the
same time; to 64, at 740-748 MiB, but 8-10% slower (more padded rows). fp32 multiplies (MKL's)
build nothing per shape and would only pay for the padding.

Only forward passes inside `applied` are rounded; backward replays what they recorded. Activation
checkpointing, which runs a forward pass again during backward (outside `applied`), is not used.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

from homeiq_trainer.training.frozen_bf16 import plain_linear_layers


class RowRounding:
    """Hooks on the frozen plain `nn.Linear` layers of `modules` that round their rows up while `applied`.

    Registered once (for 241 layers that took 1.3 ms, too much to repeat every step); outside
    `applied` they pass everything through untouched.
    """

    def __init__(self, modules: Iterable[torch.nn.Module], multiple: int) -> None:
        self.multiple = multiple
        self._active = False
        # Leading shape of each layer's input between its two hooks (a linear layer never calls itself).
        self._leading: dict[int, torch.Size] = {}
        # Frozen layers only: the trainable ones (LoRA's) compute in fp32 (`fp32_adapter_layers`).
        self._layers = [layer for layer in plain_linear_layers(modules) if not layer.weight.requires_grad]
        for layer in self._layers:
            layer.register_forward_pre_hook(self._pad)
            layer.register_forward_hook(self._unpad)

    def __len__(self) -> int:
        return len(self._layers)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """While inside, every hooked layer multiplies a row count rounded up to `multiple`."""
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self._leading.clear()

    def _pad(self, layer: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor] | None:
        if not self._active or len(args) != 1 or args[0].dim() < 2:  # called with a keyword: left alone
            return None
        # A shape left by a call that raised between the two hooks must not cut this call's output.
        self._leading.pop(id(layer), None)
        x = args[0]
        rows = math.prod(x.shape[:-1])
        extra = -rows % self.multiple
        if not extra:
            return None
        self._leading[id(layer)] = x.shape[:-1]
        device = x.device.type
        # Cast first (autocast would anyway), so the padded copy is made once and in the smaller dtype.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return (torch.nn.functional.pad(x.reshape(rows, x.shape[-1]).to(dtype), (0, 0, 0, extra)),)

    def _unpad(self, layer: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
        shape = self._leading.pop(id(layer), None)
        if shape is None:
            return None
        return out[: math.prod(shape)].reshape(*shape, out.shape[-1])
