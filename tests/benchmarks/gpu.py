"""Issue 12, item 5, on an accelerator: `python -m tests.benchmarks.gpu` (needs CUDA; not run on CPU-only machines).

The default model's dimensions (flan-t5-small) and flan-t5-base's, each on 2,000 HomeIQ-shaped
examples for 3 epochs at the defaults (precision auto: bf16 on the card): samples/s, MFU against
the card's bf16 matmul peak measured in the same run, and peak GPU memory. Prints one table.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path

from homeiq_trainer.demo import build_tiny_model, create_source_db
from homeiq_trainer.messages import TrainParams
from homeiq_trainer.settings import load_settings
from homeiq_trainer.training.data import load_examples
from homeiq_trainer.training.engine import feature_lengths, tokenize, train_adapter
from homeiq_trainer.training.evaluate import split_examples
from homeiq_trainer.training.run import hyperparameters
from tests.benchmarks.fixtures import FLAN_T5_SMALL, TOKENIZER_VOCAB
from tests.benchmarks.perf import useful_flops

FLAN_T5_BASE = {"d_model": 768, "d_ff": 2048, "num_layers": 12, "num_heads": 12, "d_kv": 64, "vocab_size": 32128}
EXAMPLES = 2000
EPOCHS = 3
MATMUL_SIZE = 8192


def bf16_peak_tflops() -> float:
    """Best of five bf16 square matmuls on the card, in TFLOP/s."""
    import torch

    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    best = math.inf
    for _ in range(6):
        torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * MATMUL_SIZE**3 / best / 1e12


def build_model(directory: Path, dims: dict[str, int]) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    build_tiny_model(directory, vocab_size=TOKENIZER_VOCAB)
    config = T5Config(
        **{**T5Config.from_pretrained(directory).to_dict(), **dims, "num_decoder_layers": dims["num_layers"]}
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def main() -> int:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs one")
        return 2
    peak = bf16_peak_tflops()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul peak {peak:.0f} TFLOP/s")
    print("| model | samples/s | MFU (bf16 peak) | peak GPU memory | held-out loss |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="homeiq-gpu-") as tmp:
        work = Path(tmp)
        source = create_source_db(work / "src.db", rows=int(EXAMPLES * 1.3), seed=5)
        examples, _ = load_examples(source, EXAMPLES)
        for name, dims in (("flan-t5-small dims", FLAN_T5_SMALL), ("flan-t5-base dims", FLAN_T5_BASE)):
            model_dir = build_model(work / name.replace(" ", "-"), dims)
            settings = load_settings(None, {"training": {"base_model": str(model_dir), "epochs": EPOCHS}})
            hp = dataclasses.replace(hyperparameters(settings, TrainParams()), early_stopping_patience=0)
            torch.cuda.reset_peak_memory_stats()
            outcome = train_adapter(examples, hp, work / f"out-{name}")
            train, _ = split_examples(examples, hp.eval_fraction, hp.min_eval_examples)
            lengths = feature_lengths(tokenize(AutoTokenizer.from_pretrained(model_dir), train, 256, 256))
            compute_s = outcome.train_runtime_s - sum(e["eval_s"] for e in outcome.eval_history)
            rate = useful_flops(AutoConfig.from_pretrained(model_dir), lengths, hp.lora_r) * EPOCHS / compute_s
            print(
                f"| {name} | {outcome.train_samples_per_second:.1f} | {rate / 1e12 / peak:.3f} "
                f"| {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB | {outcome.eval_loss:.4f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
