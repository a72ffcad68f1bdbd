"""Reference losses computed the plain way, to check the figures a run reports."""

from __future__ import annotations

from pathlib import Path


def independent_token_loss(model_dir: Path, pairs: list[tuple[str, str]], adapter: Path | None = None) -> float:
    """Mean per-token cross-entropy computed the plain way, one example at a time."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for source, target in pairs:
            enc = tokenizer(source, return_tensors="pt", truncation=True, max_length=256)
            labels = tokenizer(text_target=target, return_tensors="pt", truncation=True, max_length=256).input_ids
            loss = model(**enc, labels=labels).loss  # HF's own mean over this example's tokens
            total += float(loss) * labels.numel()
            tokens += labels.numel()
    return total / tokens
