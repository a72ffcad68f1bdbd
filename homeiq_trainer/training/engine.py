"""One LoRA fine-tuning run: examples in, adapter and losses out.

Heavy imports (torch, transformers, peft) live inside the functions, so importing this module costs
nothing; the daemon never imports it at all (training runs in a child process).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from homeiq_trainer.messages import Phase, ProgressEvent
from homeiq_trainer.training.artifacts import trainer_scratch_dir
from homeiq_trainer.training.evaluate import split_examples

if TYPE_CHECKING:
    import torch

    from homeiq_trainer.training.data import Example

_LOGGER = logging.getLogger(__name__)

LABEL_PAD = -100
# About this many points of loss history per run, whatever its length.
HISTORY_POINTS = 50
# Length grouping sorts within windows of this many batches: enough to find similar lengths,
# few enough that batch order stays random.
GROUP_WINDOW_BATCHES = 64


SumAcrossWorkers = Callable[[list[float]], list[float]]
"""Element-wise sum of a list of figures over all workers of a distributed run (the same list when alone)."""


def _alone(values: list[float]) -> list[float]:
    return values


class TrainingObserver(Protocol):
    """Receives what a run does; knows nothing about where it goes (terminal, pipe, MQTT)."""

    def phase(self, phase: Phase, message: str = "") -> None: ...

    def progress(self, event: ProgressEvent) -> None: ...


class NullObserver:
    """Ignores everything."""

    def phase(self, phase: Phase, message: str = "") -> None:
        pass

    def progress(self, event: ProgressEvent) -> None:
        pass


@dataclass(frozen=True)
class Hyperparameters:
    """Everything that shapes one run's training."""

    base_model: str
    epochs: int
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int
    source_max_tokens: int
    target_max_tokens: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: tuple[str, ...]
    seed: int
    device: str = "auto"
    threads: int = 0
    eval_fraction: float = 0.1
    min_eval_examples: int = 20
    group_by_length: bool = True


@dataclass
class TrainOutcome:
    """What training produced."""

    cancelled: bool
    train_examples: int
    eval_examples: int
    final_loss: float | None
    eval_loss: float | None
    loss_history: list[dict[str, float]]
    train_runtime_s: float
    train_samples_per_second: float
    padding_efficiency: float | None
    device: str
    steps: int


@dataclass
class _LossMeter:
    """Exact per-token loss sums, so reported losses never depend on how the Trainer scales its own."""

    window_sum: float = 0.0
    window_tokens: int = 0
    epoch_sum: float = 0.0
    epoch_tokens: int = 0
    last_epoch_mean: float | None = None
    real_tokens: int = 0
    padded_tokens: int = 0
    examples_seen: int = 0
    # Under Ray every worker meters its own batches; sums (never means) are added up over workers.
    reduce: SumAcrossWorkers = _alone
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, loss_sum: float, tokens: int) -> None:
        with self.lock:
            self.window_sum += loss_sum
            self.window_tokens += tokens
            self.epoch_sum += loss_sum
            self.epoch_tokens += tokens

    def take_window(self) -> float | None:
        with self.lock:
            total, tokens = self.reduce([self.window_sum, float(self.window_tokens)])
            self.window_sum, self.window_tokens = 0.0, 0
            return total / tokens if tokens else None

    def close_epoch(self) -> None:
        with self.lock:
            total, tokens = self.reduce([self.epoch_sum, float(self.epoch_tokens)])
            if tokens:
                self.last_epoch_mean = total / tokens
            self.epoch_sum, self.epoch_tokens = 0.0, 0

    def totals(self) -> tuple[int, int, int]:
        """(real tokens, padded tokens, examples) over all workers."""
        counts = [float(self.real_tokens), float(self.padded_tokens), float(self.examples_seen)]
        real, padded, seen = self.reduce(counts)
        return int(real), int(padded), int(seen)


def pick_device(requested: str) -> tuple[str, bool]:
    """(`cuda` or `cpu`, whether to use bf16)."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda", bool(torch.cuda.is_bf16_supported())
    return "cpu", False


def cpu_threads(requested: int) -> int:
    """Threads for torch: the requested number, else the cores this process may run on."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def grouped_order(lengths: Sequence[tuple[int, int]], batch_size: int, generator: random.Random) -> list[int]:
    """A shuffled index order in which each run of `batch_size` has similar source and target lengths.

    The Trainer's own length grouping looks only at the input, so a rare long target would still
    set the padded target length of most batches; here both lengths are balanced.
    """
    order = list(range(len(lengths)))
    generator.shuffle(order)
    window = batch_size * GROUP_WINDOW_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: (lengths[i][1], lengths[i][0]))
        # Sorting by target, then re-sorting each group of 4 batches by source, keeps both tight.
        group = batch_size * 4
        for g in range(0, len(chunk), group):
            sub = sorted(chunk[g : g + group], key=lambda i: (lengths[i][0], lengths[i][1]))
            batches.extend(sub[b : b + batch_size] for b in range(0, len(sub), batch_size))
    generator.shuffle(batches)
    return [i for batch in batches for i in batch]


class _GroupedSampler:
    """Sampler yielding `grouped_order`, a fresh shuffle each epoch."""

    def __init__(self, lengths: Sequence[tuple[int, int]], batch_size: int, seed: int) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = random.Random(self.seed + self.epoch)
        self.epoch += 1
        return iter(grouped_order(self.lengths, self.batch_size, generator))


def _tokenize(tokenizer: Any, examples: Sequence[Example], hp: Hyperparameters) -> list[dict[str, list[int]]]:
    # Tokenized once, never padded here: the collator pads each batch to its own longest row.
    sources = tokenizer([ex.instruction for ex in examples], max_length=hp.source_max_tokens, truncation=True)
    targets = tokenizer(text_target=[ex.response for ex in examples], max_length=hp.target_max_tokens, truncation=True)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for ids, mask, labels in zip(sources["input_ids"], sources["attention_mask"], targets["input_ids"], strict=True)
    ]


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.nn.functional as F

    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=LABEL_PAD,
        reduction="sum",
    )
    return loss_sum, labels.ne(LABEL_PAD).sum()


def evaluate_loss(model: Any, features: Sequence[dict[str, list[int]]], collator: Any, batch_size: int) -> float:
    """Mean per-token cross-entropy over `features` (no dropout, no gradients)."""
    import torch

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                batch = collator(list(features[start : start + batch_size]))
                labels = batch.pop("labels").to(device)
                inputs = {k: v.to(device) for k, v in batch.items()}
                logits = model(**inputs).logits
                loss_sum, count = _token_loss_sum(logits, labels)
                total += float(loss_sum)
                tokens += int(count)
    finally:
        model.train(was_training)
    return total / tokens if tokens else float("nan")


def load_base_model(base_model: str, device: str, bf16: bool) -> tuple[Any, Any]:
    """(tokenizer, model) from a hub id or local directory; never runs code from the model repo."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=False)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForSeq2SeqLM.from_pretrained(base_model, dtype=dtype, trust_remote_code=False)
    return tokenizer, model.to(device)


def train_adapter(
    examples: Sequence[Example],
    hp: Hyperparameters,
    save_dir: Path,
    *,
    observer: TrainingObserver | None = None,
    stop: threading.Event | None = None,
    resume_adapter: Path | None = None,
    sum_across_workers: SumAcrossWorkers | None = None,
) -> TrainOutcome:
    """Fine-tune a LoRA adapter on `examples` and save it (with the tokenizer) to `save_dir`.

    Returns early with `cancelled=True`, saving nothing, when `stop` is set. Inside a distributed
    run (the Ray backend) every worker calls this with the same examples and a `sum_across_workers`;
    the figures it returns are then those of all workers together.
    """
    import torch
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from safetensors import SafetensorError
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    watcher: TrainingObserver = observer or NullObserver()
    stopper: threading.Event = stop or threading.Event()
    hf_logging.set_verbosity_error()
    torch.manual_seed(hp.seed)
    device, bf16 = pick_device(hp.device)
    if device == "cpu":
        torch.set_num_threads(cpu_threads(hp.threads))

    watcher.phase(Phase.LOADING_MODEL, f"loading {hp.base_model} on {device}")
    tokenizer, base = load_base_model(hp.base_model, device, bf16)
    if resume_adapter is not None:
        model = PeftModel.from_pretrained(base, str(resume_adapter), is_trainable=True)
    else:
        lora = LoraConfig(
            task_type=TaskType.SEQ_2_SEQ_LM,
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=list(hp.lora_target_modules),
        )
        model = get_peft_model(base, lora)

    train_set, eval_set = split_examples(examples, hp.eval_fraction, hp.min_eval_examples)
    train_features = _tokenize(tokenizer, train_set, hp)
    eval_features = _tokenize(tokenizer, eval_set, hp) if eval_set else []
    reduce = sum_across_workers or _alone
    meter = _LossMeter(reduce=reduce)

    def stopping() -> bool:
        # Collective, so every worker stops at the same step and none waits for the others forever.
        return reduce([1.0 if stopper.is_set() else 0.0])[0] > 0

    # The base model (not the PEFT wrapper) knows how to shift labels into decoder inputs.
    padder = DataCollatorForSeq2Seq(tokenizer, model=base, padding=True, label_pad_token_id=LABEL_PAD)

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = padder(features)
        meter.real_tokens += int(batch["attention_mask"].sum()) + int(batch["labels"].ne(LABEL_PAD).sum())
        meter.padded_tokens += batch["input_ids"].numel() + batch["labels"].numel()
        meter.examples_seen += batch["input_ids"].shape[0]
        return batch

    def token_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        loss_sum, tokens = _token_loss_sum(outputs.logits, labels)
        meter.add(float(loss_sum.detach()), int(tokens))
        # Divided by the tokens of the whole accumulated batch, so the gradient is that of the true
        # per-token mean whatever the accumulation.
        denominator = num_items_in_batch if num_items_in_batch is not None else tokens
        return loss_sum / torch.clamp(torch.as_tensor(denominator, device=loss_sum.device), min=1)

    workers = round(reduce([1.0])[0])  # each worker takes every n-th batch
    batches_per_worker = math.ceil(math.ceil(len(train_features) / hp.batch_size) / workers)
    steps_per_epoch = math.ceil(batches_per_worker / hp.gradient_accumulation_steps)
    total_steps = steps_per_epoch * hp.epochs
    history_every = max(1, total_steps // HISTORY_POINTS)
    history: list[dict[str, float]] = []
    started = time.monotonic()

    class _Progress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            elapsed = time.monotonic() - started
            step = state.global_step
            loss = meter.take_window() if step % history_every == 0 or step == state.max_steps else None
            if loss is not None:
                history.append({"step": step, "epoch": round(float(state.epoch or 0), 4), "loss": loss})
            watcher.progress(
                ProgressEvent(
                    step=step,
                    total_steps=state.max_steps,
                    epoch=round(float(state.epoch or 0), 3),
                    loss=history[-1]["loss"] if history else None,
                    samples_per_s=round(meter.examples_seen / elapsed, 2) if elapsed > 0 else None,
                    eta_s=round(elapsed / step * (state.max_steps - step), 1) if step else None,
                )
            )
            if stopping():
                control.should_training_stop = True

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.close_epoch()

    args = TrainingArguments(
        output_dir=str(trainer_scratch_dir(save_dir)),
        num_train_epochs=hp.epochs,
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate,
        seed=hp.seed,
        data_seed=hp.seed,
        bf16=bf16,
        use_cpu=device == "cpu",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
    )
    lengths = [(len(f["input_ids"]), len(f["labels"])) for f in train_features]

    class _Trainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if hp.group_by_length and len(lengths) > hp.batch_size:
                return _GroupedSampler(lengths, hp.batch_size, hp.seed)
            return super()._get_train_sampler(train_dataset)

    trainer = _Trainer(
        model=model,
        args=args,
        train_dataset=train_features,
        data_collator=collate,
        compute_loss_func=token_loss,
        callbacks=[_Progress()],
    )
    # With its tqdm bar off the Trainer prints raw metric dicts to stdout; our observer reports instead.
    trainer.remove_callback(PrinterCallback)
    if stopping():
        return _cancelled(len(train_features), len(eval_features), history, device)

    watcher.phase(Phase.TRAINING, f"{len(train_features)} examples, {total_steps} steps")
    train_started = time.monotonic()
    trainer.train()
    runtime = time.monotonic() - train_started
    meter.close_epoch()
    if stopping():
        return _cancelled(len(train_features), len(eval_features), history, device)

    eval_loss = None
    if eval_features:
        watcher.phase(Phase.EVALUATING, f"{len(eval_features)} held-out examples")
        eval_loss = evaluate_loss(model, eval_features, padder, hp.batch_size)

    watcher.phase(Phase.SAVING, "writing adapter")
    save_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(save_dir), safe_serialization=True)
    except SafetensorError as exc:
        # Its I/O errors (a full disk) are not OSErrors; make them one, so they fail the run in one line.
        raise OSError(str(exc)) from exc
    tokenizer.save_pretrained(str(save_dir))
    real_tokens, padded_tokens, processed = meter.totals()
    return TrainOutcome(
        cancelled=False,
        train_examples=len(train_features),
        eval_examples=len(eval_features),
        final_loss=meter.last_epoch_mean,
        eval_loss=eval_loss,
        loss_history=history,
        train_runtime_s=round(runtime, 3),
        train_samples_per_second=round(processed / runtime, 3) if runtime > 0 else 0.0,
        padding_efficiency=round(real_tokens / padded_tokens, 4) if padded_tokens else None,
        device=device,
        steps=trainer.state.global_step,
    )


def _cancelled(n_train: int, n_eval: int, history: list[dict[str, float]], device: str) -> TrainOutcome:
    return TrainOutcome(
        cancelled=True,
        train_examples=n_train,
        eval_examples=n_eval,
        final_loss=None,
        eval_loss=None,
        loss_history=history,
        train_runtime_s=0.0,
        train_samples_per_second=0.0,
        padding_efficiency=None,
        device=device,
        steps=0,
    )
