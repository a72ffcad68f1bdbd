"""The HF Trainer wired for one run: token-budget batches, bf16 autocast, progress, and the best adapter.

Imports transformers at the top: only `engine.train_adapter` imports this module, inside the
training process.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    DataCollatorForSeq2Seq,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from homeiq_trainer.messages import Phase, ProgressEvent
from homeiq_trainer.training.activations import bf16_saved_activations
from homeiq_trainer.training.artifacts import trainer_scratch_dir
from homeiq_trainer.training.batching import TokenBudgetBatchSampler, token_budget_batches
from homeiq_trainer.training.engine import (
    LABEL_PAD,
    Hyperparameters,
    SumAcrossWorkers,
    TokenLoss,
    TrainingObserver,
    _alone,
    _LossMeter,
    evaluate_loss,
    feature_lengths,
    return_freed_memory,
)
from homeiq_trainer.training.frozen_bf16 import FrozenBf16Weights, fp32_adapter_layers
from homeiq_trainer.training.row_buckets import RowRounding

# About this many points of loss history per run, whatever its length.
HISTORY_POINTS = 50
# Free heap memory goes back to the system after every this many steps (see _ReturnFreedMemory).
TRIM_EVERY_STEPS = 10
# bf16 on a CPU: sequence lengths are padded to a multiple of this. oneDNN builds a kernel for every new
# matrix shape it meets in bf16 (a few ms each, and a run meets hundreds); rounded lengths make shapes
# repeat. Measured on a 2-core AMX Xeon: an epoch 10.1 -> 9.4 s. fp32 matmuls do not care, and pay for
# the padding, so they keep exact lengths.
CPU_BF16_PAD_MULTIPLE = 8
# ... and every linear layer's rows (batch × length) to a multiple of this (see training/row_buckets.py).
# Measured on a 2-core Zen 5 EPYC, 2,000 examples at defaults, one epoch: peak RSS 1,341-1,346 MiB
# without, 1,165-1,185 with 32, in the same 96-100 s of training; 64 held 1,085-1,093 MiB but took 106 s.
CPU_BF16_ROW_MULTIPLE = 32
Features = Sequence[dict[str, list[int]]]


class _BatchedTrainer(Trainer):
    """The stock Trainer with our token-budget batches and, on CPUs, bf16 autocast or bf16 saved activations."""

    batch_sampler: TokenBudgetBatchSampler
    cpu_bf16: bool = False
    bf16_activations: bool = False
    frozen_bf16: FrozenBf16Weights | None = None
    row_rounding: RowRounding | None = None

    def get_train_dataloader(self) -> Any:
        from accelerate.data_loader import prepare_data_loader

        loader = torch.utils.data.DataLoader(
            self.train_dataset,  # type: ignore[arg-type]
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=0,
            pin_memory=self.args.dataloader_pin_memory,
        )
        if self.batch_sampler.workers == 1:
            return self.accelerator.prepare(loader)
        # The sampler has sharded whole batches already; Accelerate's own sharding would cut them again
        # (and refuses batches of varying size), so it sees this worker's loader as that of one process.
        return prepare_data_loader(loader, self.accelerator.device, num_processes=1, process_index=0)

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        stack = super().compute_loss_context_manager()
        if self.bf16_activations:
            stack.enter_context(bf16_saved_activations(self.model))
        if self.frozen_bf16 is not None:
            stack.enter_context(self.frozen_bf16.swapped_in())
        if self.row_rounding is not None:
            stack.enter_context(self.row_rounding.applied())
        return stack

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:
        # Forward only: backward runs outside autocast, as PyTorch recommends. On CUDA the weights are bf16 already.
        if not self.cpu_bf16:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        # torch's CPU flash attention runs its bf16 backward 8x slower than its fp32 one (1.6 of a 10 s
        # epoch); the plain attention (two batched multiplies) does not. The choice made in the forward
        # pass also picks the backward's kernel.
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack


@dataclass
class TrainingSession:
    """One run's Trainer, its callbacks and what they record."""

    model: Any
    base: Any
    tokenizer: Any
    hp: Hyperparameters
    device: str
    precision: str
    save_dir: Path
    meter: _LossMeter
    token_loss: TokenLoss
    watcher: TrainingObserver
    stopper: threading.Event
    started: float
    reduce: SumAcrossWorkers = _alone
    started_cpu: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    best: BestAdapter | None = None
    total_steps: int = 0
    last_progress: ProgressEvent | None = None

    def stopping(self) -> bool:
        """Whether any worker was asked to stop; collective, so all stop at the same step and none waits forever."""
        return self.reduce([1.0 if self.stopper.is_set() else 0.0])[0] > 0

    def trainer(self, train_features: Features, eval_features: Features) -> Trainer:
        """The Trainer for this run, its callbacks attached."""
        hp = self.hp
        cpu_bf16 = self.device == "cpu" and self.precision == "bf16"
        padder = DataCollatorForSeq2Seq(
            self.tokenizer,
            model=self.base,
            padding=True,
            label_pad_token_id=LABEL_PAD,
            pad_to_multiple_of=CPU_BF16_PAD_MULTIPLE if cpu_bf16 else None,
        )
        meter = self.meter
        rank, workers = _rank_and_workers()
        sampler = TokenBudgetBatchSampler(
            feature_lengths(train_features), hp.batch_tokens, hp.batch_size, hp.seed, hp.group_by_length, rank, workers
        )
        # Whether each collated batch is a top-up repeat, in order: the DataLoader (no worker
        # processes) collates each batch right after the sampler yields it, and losses come in that order.
        top_ups: deque[bool] = deque()

        def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
            batch = padder(features)
            top_ups.append(sampler.last_was_top_up)
            if not sampler.last_was_top_up:
                meter.real_tokens += int(batch["attention_mask"].sum()) + int(batch["labels"].ne(LABEL_PAD).sum())
                meter.padded_tokens += batch["input_ids"].numel() + batch["labels"].numel()
                meter.examples_seen += batch["input_ids"].shape[0]
            return batch

        def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
            loss_sum, tokens = self.token_loss(outputs.logits, labels)
            if top_ups and top_ups.popleft():
                # A repeat that only keeps the workers' DDP steps in lockstep: it trains nothing and counts nowhere.
                return loss_sum * 0.0
            meter.add(float(loss_sum.detach()), int(tokens))
            # Divided by the tokens of the whole accumulated batch, so the gradient is that of the true
            # per-token mean whatever the accumulation.
            denominator = num_items_in_batch if num_items_in_batch is not None else tokens
            return loss_sum / torch.clamp(torch.as_tensor(denominator, device=loss_sum.device), min=1)

        self.total_steps = math.ceil(len(sampler) / hp.gradient_accumulation_steps) * hp.epochs
        callbacks: list[TrainerCallback] = [_Progress(self), _ReturnFreedMemory()]
        if eval_features:
            self.best = BestAdapter(self, eval_features, padder)
            callbacks.append(self.best)
        trainer = _BatchedTrainer(
            model=self.model,
            args=self._arguments(),
            train_dataset=train_features,
            data_collator=collate,
            compute_loss_func=loss,
            callbacks=callbacks,
        )
        trainer.batch_sampler = sampler
        trainer.cpu_bf16 = cpu_bf16
        if cpu_bf16:
            head = self.token_loss.head
            trainer.frozen_bf16 = FrozenBf16Weights([self.model] if head is None else [self.model, head])
            trainer.row_rounding = RowRounding([self.model], CPU_BF16_ROW_MULTIPLE)
            fp32_adapter_layers([self.model])
        # fp32 on a CPU: keep what backward needs in bf16 (under autocast most of it is bf16 already).
        trainer.bf16_activations = self.device == "cpu" and self.precision == "fp32"
        # With its tqdm bar off the Trainer prints raw metric dicts to stdout; our observer reports instead.
        trainer.remove_callback(PrinterCallback)
        return trainer

    def _arguments(self) -> TrainingArguments:
        hp = self.hp
        return TrainingArguments(
            output_dir=str(trainer_scratch_dir(self.save_dir)),
            num_train_epochs=hp.epochs,
            per_device_train_batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            learning_rate=hp.learning_rate,
            seed=hp.seed,
            data_seed=hp.seed,
            bf16=self.device == "cuda" and self.precision == "bf16",
            use_cpu=self.device == "cpu",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=self.device == "cuda",
        )

    def finish_evaluation(self, state: TrainerState) -> float | None:
        """The held-out loss of the adapter kept (the best one seen), restored into the model."""
        return self.best.finish(state) if self.best else None

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


def _rank_and_workers() -> tuple[int, int]:
    """(this worker's rank, workers) of the DDP run this process is part of; (0, 1) when alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Progress(TrainerCallback):
    """Loss history, progress events and cancellation at step boundaries."""

    def __init__(self, session: TrainingSession) -> None:
        self.session = session
        self.every = max(1, session.total_steps // HISTORY_POINTS)
        self.began = time.monotonic()

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # Rate and ETA from here: loading and tokenizing, counted in, were multiplied by every step to go.
        self.began = time.monotonic()

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        session, meter, history = self.session, self.session.meter, self.session.history
        elapsed = time.monotonic() - self.began
        step = state.global_step
        loss = meter.take_window() if step % self.every == 0 or step == state.max_steps else None
        if loss is not None:
            history.append({"step": step, "epoch": round(float(state.epoch or 0), 4), "loss": loss})
        session.last_progress = ProgressEvent(
            step=step,
            total_steps=state.max_steps,
            epoch=round(float(state.epoch or 0), 3),
            loss=history[-1]["loss"] if history else None,
            samples_per_s=round(meter.examples_seen / elapsed, 2) if elapsed > 0 else None,
            eta_s=round(elapsed / step * (state.max_steps - step), 1) if step else None,
        )
        session.watcher.progress(session.last_progress)
        if session.stopping():
            control.should_training_stop = True

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.session.meter.close_epoch()


class _ReturnFreedMemory(TrainerCallback):
    """Hands freed heap pages back to the system every TRIM_EVERY_STEPS steps.

    Batches of ever-changing shapes leave glibc's heap fragmented: freed activation memory stays
    resident and the process's peak creeps up with every new shape. Trimming after every step held
    that down but cost 23% of an epoch, as each step then faulted its pages back in.
    """

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step % TRIM_EVERY_STEPS == 0:
            return_freed_memory()


class BestAdapter(TrainerCallback):
    """Held-out loss every `eval_every_steps` (0: each epoch), early stopping, and the best adapter kept."""

    def __init__(self, session: TrainingSession, features: Features, collator: Any) -> None:
        hp = session.hp
        self.session = session
        self.features = features
        self.collator = collator
        lengths = feature_lengths(features)
        rank, workers = _rank_and_workers()
        # Every worker scores its share of the held-out batches; evaluate_loss adds the sums up.
        self.batches = token_budget_batches(lengths, hp.batch_tokens, hp.batch_size, random.Random(hp.seed))[
            rank::workers
        ]
        self.history: list[dict[str, float]] = []
        self.best_loss = math.inf
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] = {}
        self.worse = 0
        self.stopped_early = False
        self.last_step = -1

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        every = self.session.hp.eval_every_steps
        if every and state.global_step % every == 0:
            self._evaluate(state, control)

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self.session.hp.eval_every_steps:
            self._evaluate(state, control)

    def _evaluate(self, state: TrainerState, control: TrainerControl | None) -> None:
        session = self.session
        if session.stopping() or state.global_step == self.last_step:
            return
        session.watcher.phase(Phase.EVALUATING, f"{len(self.features)} held-out examples at step {state.global_step}")

        def heartbeat(done: int, total: int) -> None:
            # Keeps the daemon's stall timer fed on a long evaluation (the observer throttles these): the
            # last step's figures again, so loss, rate and ETA do not turn unknown meanwhile.
            step = ProgressEvent(
                step=state.global_step, total_steps=state.max_steps, epoch=round(float(state.epoch or 0), 3)
            )
            last = session.last_progress
            session.watcher.progress(last if last is not None and last.step == state.global_step else step)

        began, began_cpu = time.monotonic(), time.process_time()
        loss = evaluate_loss(
            session.model, self.features, self.collator, self.batches, session.token_loss, heartbeat, session.reduce
        )
        self.last_step = state.global_step
        self.history.append(
            {
                "step": state.global_step,
                "epoch": round(float(state.epoch or 0), 4),
                "eval_loss": loss,
                "elapsed_s": round(session.elapsed_s(), 3),
                "eval_s": round(time.monotonic() - began, 3),
                "eval_cpu_s": round(time.process_time() - began_cpu, 3),
                "elapsed_cpu_s": round(time.process_time() - session.started_cpu, 3),
            }
        )
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.worse = loss, state.global_step, 0
            self.best_state = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
        else:
            self.worse += 1
            patience = session.hp.early_stopping_patience
            if control is not None and patience and self.worse >= patience:
                control.should_training_stop = True
                self.stopped_early = True
        if control is not None and state.global_step < state.max_steps and not control.should_training_stop:
            session.watcher.phase(Phase.TRAINING, f"step {state.global_step} of {state.max_steps}")

    def finish(self, state: TrainerState) -> float:
        """Evaluate the final adapter if that has not happened yet, then put the best one back."""
        self._evaluate(state, None)
        if self.best_step is not None and self.best_step != self.last_step:
            with torch.no_grad():
                for name, param in self.session.model.named_parameters():
                    if name in self.best_state:
                        param.copy_(self.best_state[name])
        return self.best_loss
