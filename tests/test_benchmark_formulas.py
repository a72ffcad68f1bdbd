"""The benchmarks' FLOP formula against torch's own FLOP counter, and their length distributions."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_useful_flops_matches_torchs_flop_counter(tiny_model: Path) -> None:
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, TaskType, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForSeq2SeqLM

    from tests.benchmarks.perf import useful_flops

    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_model)
    model = get_peft_model(
        base, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=4, lora_alpha=4, target_modules=["q", "v"])
    )
    model.eval()
    source, target = 13, 7
    inputs = {
        "input_ids": torch.randint(3, 100, (1, source)),
        "decoder_input_ids": torch.randint(3, 100, (1, target)),
    }
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    # useful_flops counts forward + activation gradients: twice the forward. Torch's counter sees the
    # weight multiplies (aten.mm), not T5's attention products, so those are left out on both sides.
    assert useful_flops(base.config, [(source, target)], lora_r=4, attention=False) / 2 == pytest.approx(
        counter.get_total_flops(), rel=1e-9
    )
    with_attention = useful_flops(base.config, [(source, target)], lora_r=4)
    assert with_attention > useful_flops(base.config, [(source, target)], lora_r=4, attention=False)


def test_long_tailed_lengths_are_long_tailed() -> None:
    from tests.benchmarks.perf import long_tailed_lengths

    lengths = long_tailed_lengths(1800)
    targets = sorted(t for _, t in lengths)
    assert targets[len(targets) // 2] < 60 and targets[-1] == 256 and sum(t == 256 for t in targets) >= 18
