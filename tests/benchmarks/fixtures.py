"""Benchmark inputs: a flan-t5-small-shaped random model, HomeIQ-shaped data, and the examples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from homeiq_trainer.demo import build_tiny_model, create_source_db

# google/flan-t5-small's dimensions.
FLAN_T5_SMALL = {"d_model": 512, "d_ff": 1024, "num_layers": 8, "num_heads": 6, "d_kv": 64, "vocab_size": 32128}
# The demo tokenizer's vocabulary: big enough that demo words are mostly whole tokens, so queries
# come out at 10-40 tokens like HomeIQ's queries do under T5's SentencePiece vocabulary.
TOKENIZER_VOCAB = 1200
BENCH_EXAMPLES = 200
# Enough rows that, after the 10% bad rows and duplicates, BENCH_EXAMPLES usable ones remain.
BENCH_ROWS = 260


def build_bench_model(directory: Path) -> Path:
    """The demo tokenizer (bigger vocabulary) with a randomly initialised flan-t5-small-sized T5."""
    marker = directory / "bench_model.json"
    if marker.exists() and json.loads(marker.read_text()) == {**FLAN_T5_SMALL, "initializer_factor": 1.0}:
        return directory
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    shutil.rmtree(directory, ignore_errors=True)
    build_tiny_model(directory, vocab_size=TOKENIZER_VOCAB)
    small = T5Config.from_pretrained(directory)
    # T5's own random initialisation (initializer_factor 1.0): untrained losses are large (~130 per
    # token), but both pipelines start from the same weights and learning shows in the comparison.
    # (With a small factor, 0.05, neither pipeline moved off log(vocab) in one epoch.)
    config = T5Config(
        **{
            **small.to_dict(),
            **FLAN_T5_SMALL,
            "num_decoder_layers": FLAN_T5_SMALL["num_layers"],
            "initializer_factor": 1.0,
        }
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    marker.write_text(json.dumps({**FLAN_T5_SMALL, "initializer_factor": 1.0}))
    return directory


def build_bench_db(directory: Path) -> Path:
    """A HomeIQ-shaped source database with at least BENCH_EXAMPLES usable rows."""
    path = directory / "ai_automation.db"
    if not path.exists():
        create_source_db(path, rows=BENCH_ROWS, bad_fraction=0.1, seed=7)
    return path
