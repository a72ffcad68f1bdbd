"""THE REFERENCE, not homeiq-trainer: HomeIQ's own `train_soft_prompt.py` pipeline, re-implemented.

Written from the description in `shared/HOMEIQ_DATA.md` so the benchmarks can compare against it on
the same machine: source and target truncated *and padded* to 384 tokens, batch size 1 with gradient
accumulation 2, learning rate 5e-5, LoRA r=16/alpha=16/dropout 0.05 on `q` and `v`, a checkpoint
saved each epoch, no evaluation, CPU fp32, the stock HF `Trainer`.

One deliberate kindness: padded label positions are set to -100, so the reference's loss is the
per-token loss over real target tokens, measured the same way as homeiq-trainer's (otherwise its
loss would be mostly the trivial "predict padding" loss and the comparison would mean nothing).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_LENGTH = 384
BATCH_SIZE = 1
GRADIENT_ACCUMULATION = 2
LEARNING_RATE = 5e-5
LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q", "v"]}
LABEL_PAD = -100


def load_reference_examples(path: Path, max_samples: int) -> list[tuple[str, str]]:
    """HomeIQ's loader, flaw included: LIMIT is applied before bad rows are skipped."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = conn.execute(
        "SELECT original_query, suggestions FROM ask_ai_queries WHERE suggestions IS NOT NULL "
        "ORDER BY created_at DESC LIMIT ?",
        (max_samples,),
    ).fetchall()
    conn.close()
    pairs = []
    for query, raw in rows:
        try:
            suggestions = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(suggestions, list) or not suggestions:
            continue

        def conf(s: Any) -> float:
            try:
                return float(s.get("confidence", 0) or 0)
            except (TypeError, ValueError, AttributeError):
                return 0.0

        best = max(suggestions, key=conf)
        description = (best.get("description") or "").strip() if isinstance(best, dict) else ""
        if description:
            pairs.append((query.strip(), description))
    return pairs


@dataclass
class ReferenceOutcome:
    """What the reference run produced."""

    wall_s: float
    train_runtime_s: float
    final_loss: float
    padding_efficiency: float
    steps: int
    examples: int


def train_reference(
    pairs: Sequence[tuple[str, str]],
    base_model: Path,
    save_dir: Path,
    epochs: int = 1,
    seed: int = 42,
    pad_to_max_length: bool = True,
    callbacks: Sequence[Any] = (),
) -> ReferenceOutcome:
    """Train HomeIQ's way and save the adapter; losses are exact per-token means over real tokens.

    `pad_to_max_length=False` drops only the padding. At batch size 1 that changes no number the
    model computes on real tokens (padding is masked in attention and -100 in the labels), so it
    gives the reference's loss curve at a fraction of the time.
    """
    started = time.monotonic()
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForSeq2SeqLM.from_pretrained(base_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, **LORA))

    padding = "max_length" if pad_to_max_length else "do_not_pad"
    dataset = []
    real = processed = 0
    for source, target in pairs:
        enc = tokenizer(source, max_length=MAX_LENGTH, padding=padding, truncation=True, return_tensors="pt")
        dec = tokenizer(
            text_target=target, max_length=MAX_LENGTH, padding=padding, truncation=True, return_tensors="pt"
        )
        labels = dec["input_ids"][0].clone()
        labels[labels == tokenizer.pad_token_id] = LABEL_PAD
        # What the model does itself when handed labels (the Trainer hands them to the loss function instead).
        decoder_input_ids = base.prepare_decoder_input_ids_from_labels(labels=labels[None])[0]
        dataset.append(
            {
                "input_ids": enc["input_ids"][0],
                "attention_mask": enc["attention_mask"][0],
                "decoder_input_ids": decoder_input_ids,
                "labels": labels,
            }
        )
        real += int(enc["attention_mask"].sum()) + int(labels.ne(LABEL_PAD).sum())
        processed += enc["input_ids"].numel() + labels.numel()

    sums = {"loss": 0.0, "tokens": 0}

    def per_token_loss(outputs: Any, batch_labels: Any, num_items_in_batch: Any = None) -> Any:
        # The stock seq2seq loss (mean over real tokens of the accumulated batch), also summed for reporting.
        logits = outputs.logits
        loss_sum = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            batch_labels.reshape(-1),
            ignore_index=LABEL_PAD,
            reduction="sum",
        )
        tokens = int(batch_labels.ne(LABEL_PAD).sum())
        sums["loss"] += float(loss_sum.detach())
        sums["tokens"] += tokens
        denominator = num_items_in_batch if num_items_in_batch is not None else tokens
        return loss_sum / max(int(denominator), 1)

    args = TrainingArguments(
        output_dir=str(save_dir / "checkpoints"),
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION,
        learning_rate=LEARNING_RATE,
        save_strategy="epoch",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, compute_loss_func=per_token_loss, callbacks=list(callbacks)
    )
    train_started = time.monotonic()
    trainer.train()
    runtime = time.monotonic() - train_started
    model.save_pretrained(str(save_dir / "adapter"))
    tokenizer.save_pretrained(str(save_dir / "adapter"))
    return ReferenceOutcome(
        wall_s=time.monotonic() - started,
        train_runtime_s=runtime,
        final_loss=sums["loss"] / sums["tokens"],
        padding_efficiency=real / processed,
        steps=trainer.state.global_step,
        examples=len(pairs),
    )
