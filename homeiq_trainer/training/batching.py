"""Token-budget batches: as many length-grouped examples per batch as fit a padded-token budget.

fairseq's `max_tokens` idea: short examples make big batches (big matrices, fast on a CPU), long
ones small batches (bounded memory). Pure Python, so it is tested and benchmarked without torch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

# Cells are split at the best cut within the middle of their sorted order (never peeling off fewer
# than this share), so the recursion stays about log(n) deep.
MIN_SPLIT_SHARE = 0.125
# Larger sets are first cut into slices of this many examples by target length, so planning stays
# near-linear (2,000 examples: ~0.1 s).
PLAN_SLICE_EXAMPLES = 2048


def padded_tokens(lengths: Sequence[tuple[int, int]], batch: Sequence[int]) -> int:
    """Tokens a batch costs once padded: rows × (longest source + longest target)."""
    if not batch:
        return 0
    return len(batch) * (max(lengths[i][0] for i in batch) + max(lengths[i][1] for i in batch))


def padding_efficiency(lengths: Sequence[tuple[int, int]], batches: Sequence[Sequence[int]]) -> float:
    """Real ÷ padded tokens over `batches` (1.0 means no padding at all)."""
    real = sum(lengths[i][0] + lengths[i][1] for batch in batches for i in batch)
    padded = sum(padded_tokens(lengths, batch) for batch in batches)
    return real / padded if padded else 1.0


def token_budget_batches(
    lengths: Sequence[tuple[int, int]],
    batch_tokens: int,
    max_examples: int,
    generator: random.Random,
    group_by_length: bool = True,
) -> list[list[int]]:
    """Indices cut into batches of at most `max_examples` whose padded tokens stay within `batch_tokens`.

    With `group_by_length` the (source, target) length plane is split like a k-d tree: a cell that
    does not fit one batch is cut, along source or target length, where the two halves' padded
    tokens are least, until every cell fits. Without it, shuffled examples are packed in order. An
    example longer than the budget on its own trains alone. Ties are broken at random.
    """
    order = list(range(len(lengths)))
    generator.shuffle(order)
    if not group_by_length:
        return _pack_in_order(lengths, order, batch_tokens, max_examples)
    order.sort(key=lambda i: lengths[i][1])
    batches: list[list[int]] = []
    for start in range(0, len(order), PLAN_SLICE_EXAMPLES):
        batches.extend(_split_cells(lengths, order[start : start + PLAN_SLICE_EXAMPLES], batch_tokens, max_examples))
    return batches


def _fits(lengths: Sequence[tuple[int, int]], cell: list[int], batch_tokens: int, max_examples: int) -> bool:
    return len(cell) <= 1 or (len(cell) <= max_examples and padded_tokens(lengths, cell) <= batch_tokens)


def _split_cells(
    lengths: Sequence[tuple[int, int]], cell: list[int], batch_tokens: int, max_examples: int
) -> list[list[int]]:
    done: list[list[int]] = []
    pending = [cell]
    while pending:
        cell = pending.pop()
        if _fits(lengths, cell, batch_tokens, max_examples):
            done.append(cell)
            continue
        low = max(1, int(len(cell) * MIN_SPLIT_SHARE))
        high = max(low + 1, len(cell) - low)
        best: tuple[int, list[int], int] | None = None
        for axis in (0, 1):
            ordered = sorted(cell, key=lambda i: (lengths[i][axis], lengths[i][1 - axis]))
            left = _prefix_padded(lengths, ordered)
            right = _prefix_padded(lengths, ordered[::-1])[::-1]
            for cut in range(low, high):
                cost = left[cut - 1] + right[cut]
                if best is None or cost < best[0]:
                    best = (cost, ordered, cut)
        assert best is not None
        _, ordered, cut = best
        pending.extend((ordered[:cut], ordered[cut:]))
    return done


def _prefix_padded(lengths: Sequence[tuple[int, int]], ordered: list[int]) -> list[int]:
    """Padded tokens of each prefix of `ordered` as one batch."""
    out = []
    longest_source = longest_target = 0
    for count, i in enumerate(ordered, start=1):
        longest_source = max(longest_source, lengths[i][0])
        longest_target = max(longest_target, lengths[i][1])
        out.append(count * (longest_source + longest_target))
    return out


def _pack_in_order(
    lengths: Sequence[tuple[int, int]], order: list[int], batch_tokens: int, max_examples: int
) -> list[list[int]]:
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        if batch and not _fits(lengths, [*batch, i], batch_tokens, max_examples):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


class TokenBudgetBatchSampler:
    """A batch sampler over fixed token-budget batches, in a fresh seeded order each epoch.

    The batches themselves are cut once (as fairseq does), so every epoch has the same number of
    steps and the Trainer's step count holds; only their order changes. In a distributed run
    (`workers` > 1) every worker cuts and orders the same batches and takes every `workers`-th
    one from its `rank` on, whole (never split, so the token budget holds). All workers take the
    same number, so their DDP steps stay in lockstep: where the batches do not divide evenly, the
    last round is topped up with batches from the start of the epoch's order, as PyTorch's
    DistributedSampler and Accelerate top up. `last_was_top_up` says whether the batch just yielded
    is such a repeat, so the training loop can give it no weight (its loss and tokens count nowhere).
    """

    def __init__(
        self,
        lengths: Sequence[tuple[int, int]],
        batch_tokens: int,
        max_examples: int,
        seed: int,
        group_by_length: bool = True,
        rank: int = 0,
        workers: int = 1,
    ) -> None:
        if not 0 <= rank < workers:
            raise ValueError(f"rank {rank} is not one of {workers} workers")
        self.batches = token_budget_batches(lengths, batch_tokens, max_examples, random.Random(seed), group_by_length)
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.workers = workers
        self.last_was_top_up = False

    def set_epoch(self, epoch: int) -> None:
        """The Trainer calls this before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this worker takes per epoch."""
        return -(-len(self.batches) // self.workers)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.batches)
        random.Random(self.seed + 1 + self.epoch).shuffle(order)
        real = len(order)
        if self.workers > 1 and order:
            short = len(self) * self.workers - real
            order += [order[i % real] for i in range(short)]
        for position in range(self.rank, len(order), self.workers):
            self.last_was_top_up = position >= real
            yield order[position]
        self.last_was_top_up = False
