"""Cross-entropy through the output layer in chunks of tokens, never holding a batch's logits.

A batch's full-vocabulary logits (tokens × 32,128 in fp32, plus their softmax and gradient) were
most of a run's peak memory. Here the model returns its last hidden states instead (the output
layer swapped for an identity while training), and `linear_cross_entropy` runs the output layer
one chunk of labelled tokens at a time. Like fused kernels (Liger's, Apple's cut cross-entropy,
both GPU-only), it computes each chunk's gradient with respect to the hidden states during the
forward pass and keeps only that (tokens × d_model), so backward recomputes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# exp(-80) ≈ 1.8e-35 is still a normal fp32 number (subnormals start below ~1.2e-38).
LOG_PROB_FLOOR = -80.0
# Labelled tokens per chunk: 256 × 32,128 fp32 logits is 32 MiB (the softmax is computed in place).
CHUNK_TOKENS = 256
# bf16 on a CPU: a chunk's rows are padded with zeros to a multiple of this for the two multiplies.
# oneDNN builds a kernel per new bf16 shape, and a batch's last chunk has any row count; 16 sizes
# instead of 256 are soon all built (the output layer's multiplies took 3x longer per call without).
CPU_BF16_ROW_MULTIPLE = 16


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `labels`, chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        compute_dtype: torch.dtype,
        chunk_tokens: int,
    ) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0]
        exact = torch.promote_types(hidden.dtype, torch.float32)  # softmax never below fp32
        total = torch.zeros((), dtype=exact, device=hidden.device)
        grad = torch.empty_like(hidden) if needs_grad else None
        w = weight.detach().to(compute_dtype)
        multiple = CPU_BF16_ROW_MULTIPLE if compute_dtype == torch.bfloat16 and hidden.device.type == "cpu" else 1
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_tokens):
                end = min(start + chunk_tokens, hidden.shape[0])
                rows = end - start
                shifted = (_padded(hidden[start:end].to(compute_dtype), multiple) @ w.T)[:rows].to(exact)
                target = labels[start:end, None]
                # log-softmax as (logit - max) - log Σ exp(logit - max), with one exp over the chunk.
                shifted.sub_(shifted.amax(dim=-1, keepdim=True))
                target_shifted = shifted.gather(1, target).squeeze(1)
                # Clamped first: exp of numbers below about -87 underflows, and on x86 that takes a slow
                # path ~10× longer (torch's own logsumexp and softmax take it on an untrained model's
                # far-off tokens). Each clamped term is < 2e-35 beside the max's 1, so no figure moves.
                probs = shifted.clamp_(min=LOG_PROB_FLOOR).exp_()
                norm = probs.sum(dim=-1)
                total += (norm.log() - target_shifted).sum()
                if grad is not None:
                    # d(loss)/d(logits) = softmax - one-hot; d(loss)/d(hidden) = that @ weight.
                    probs.div_(norm[:, None])
                    probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                    grad[start:end] = (_padded(probs.to(compute_dtype), multiple) @ w)[:rows].to(hidden.dtype)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def _padded(rows: torch.Tensor, multiple: int) -> torch.Tensor:
    """`rows` with zero rows added up to a multiple of `multiple` (itself when it is one already)."""
    extra = -rows.shape[0] % multiple
    return torch.nn.functional.pad(rows, (0, 0, 0, extra)) if extra else rows


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS
) -> torch.Tensor:
    """Sum over tokens of cross-entropy(hidden @ weight.T, labels); `hidden` is (tokens, d_model).

    Under autocast the output layer runs in the autocast dtype, the softmax always in fp32.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    result: torch.Tensor = _LinearCrossEntropy.apply(hidden, weight, labels, dtype, chunk_tokens)
    return result


def output_layer(model: Any) -> torch.nn.Linear | None:
    """The model's plain, frozen output layer, or None when it has none (or trains it)."""
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    return head


@contextlib.contextmanager
def hidden_states_out(model: Any) -> Iterator[torch.nn.Linear | None]:
    """While inside, `model(...).logits` are the hidden states the output layer would read.

    Yields the output layer (for `linear_cross_entropy`), or None where the model's layer cannot be
    swapped safely; then the model is left as it is and its logits are real logits.
    """
    head = output_layer(model)
    if head is None:
        yield None
        return
    model.lm_head = torch.nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head
