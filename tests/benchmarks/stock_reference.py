"""THE SECOND REFERENCE, not homeiq-trainer: what a competent engineer writes in thirty lines with stock parts.

Tokenize once, `DataCollatorForSeq2Seq` dynamic padding, the Trainer's own length grouping, batch 8,
lr 3e-4, the same LoRA shape as homeiq-trainer, fp32 on CPU, no evaluation or checkpoints, the
model's own loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

BATCH_SIZE = 8
LEARNING_RATE = 3e-4
LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q", "v"]}


def train_stock(pairs: Sequence[tuple[str, str]], base_model: Path, save_dir: Path, epochs: int = 1) -> float:
    """Train and save the adapter; returns the wall time from start to saved adapter, in seconds."""
    started = time.monotonic()
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    base = AutoModelForSeq2SeqLM.from_pretrained(base_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, **LORA))
    dataset = [
        {
            "input_ids": tokenizer(source, max_length=256, truncation=True)["input_ids"],
            "labels": tokenizer(text_target=target, max_length=256, truncation=True)["input_ids"],
        }
        for source, target in pairs
    ]
    args = TrainingArguments(
        output_dir=str(save_dir / "scratch"),
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=42,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, model=base, padding=True)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()  # type: ignore[arg-type]
    model.save_pretrained(str(save_dir / "adapter"))
    return time.monotonic() - started
