"""The held-out split, and the same measurements of the new adapter and of the one in use.

The split comes from a hash of each example's instruction, not from a per-run shuffle: an example
held out once is held out in every run, so the adapter in use never trained on the examples that
judge its successor. That holds for a run with too few examples to evaluate (they are left out of
its training all the same) and, by `comparable`, for an adapter trained with a smaller
`data.eval_fraction`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from homeiq_trainer.messages import Phase, ProgressEvent, first_line

if TYPE_CHECKING:
    from homeiq_trainer.settings import EvaluationSettings
    from homeiq_trainer.training.data import Example
    from homeiq_trainer.training.engine import Hyperparameters, TrainingObserver

_LOGGER = logging.getLogger(__name__)

DEFAULT_PROBES = 5
# Generation batches: small enough that a Raspberry Pi reports progress every few seconds.
GENERATE_BATCH = 8
SAMPLE_TEXT_CHARS = 160
_HASH_SPAN = float(2**64)


def _bucket(text: str) -> float:
    """Where `text` falls in [0, 1): the same for the same words, whatever the run, case, spacing or
    Unicode form (T5's tokenizer reads "Küche" typed on a Mac, NFD, as the NFC one: the same example)."""
    normal = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return int.from_bytes(hashlib.sha256(normal.encode("utf-8")).digest()[:8], "big") / _HASH_SPAN


def held_out(example: Example, fraction: float) -> bool:
    """Whether `example` is held out of training at `fraction`, in every run."""
    return _bucket(example.instruction) < fraction


def split_examples(
    examples: Sequence[Example], fraction: float, min_examples: int
) -> tuple[list[Example], list[Example]]:
    """(train, eval): eval holds the examples whose instruction hashes below `fraction`.

    With fewer than `min_examples` there is no eval set, and those examples are still kept out of
    training: the first run on a new install is served without a comparison, and the next one would
    otherwise judge it on examples it learned. Only where nothing else would be left to train on
    (an example or two) do they train.
    """
    train: list[Example] = []
    held: list[Example] = []
    for example in examples:
        (held if held_out(example, fraction) else train).append(example)
    if not train:
        return list(examples), []
    if len(examples) < min_examples:
        return train, []
    return train, held


def comparable(eval_set: Sequence[Example], trained_fraction: float) -> list[Example]:
    """The examples of `eval_set` an adapter trained with `data.eval_fraction = trained_fraction`
    never saw (a larger fraction now holds out examples it learned)."""
    return [example for example in eval_set if held_out(example, trained_fraction)]


@dataclass
class AdapterScores:
    """One adapter measured on the held-out examples."""

    run_id: str
    eval_loss: float | None = None
    chrf: float | None = None
    exact_match: float | None = None
    generated: int = 0

    def metrics(self) -> dict[str, float | None]:
        return {"eval_loss": self.eval_loss, "chrf": self.chrf, "exact_match": self.exact_match}


@dataclass
class Evaluation:
    """Both adapters on the same examples, and their answers to the probe queries."""

    eval_examples: int
    candidate: AdapterScores
    served: AdapterScores | None = None
    served_note: str | None = None
    samples: list[dict[str, str | None]] = field(default_factory=list)
    in_use: str | None = None
    """The run `latest` served when the evaluation began (scored as `served` if it shares the base model)."""

    def record(self) -> dict[str, Any]:
        """As written to `training_run.json` and the history."""
        return {
            "eval_examples": self.eval_examples,
            "candidate": asdict(self.candidate),
            "served": asdict(self.served) if self.served else None,
            "served_note": self.served_note,
        }


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> tuple[float | None, float | None]:
    """(chrF from sacrebleu, exact match in %) of generations against references."""
    if not predictions:
        return None, None
    from sacrebleu.metrics import CHRF

    chrf = CHRF().corpus_score(list(predictions), [list(references)]).score
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(predictions)
    return round(chrf, 4), round(100.0 * exact, 4)


class _Stopped(Exception):
    """The run was asked to stop during evaluation."""


def generate(
    model: Any,
    tokenizer: Any,
    sources: Sequence[str],
    source_max_tokens: int,
    max_new_tokens: int,
    on_batch: Callable[[int], None],
) -> list[str]:
    """Greedy answers to `sources`, `on_batch(n)` after each batch."""
    import torch

    device = next(model.parameters()).device
    answers: list[str] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sources), GENERATE_BATCH):
            chunk = list(sources[start : start + GENERATE_BATCH])
            enc = tokenizer(chunk, max_length=source_max_tokens, truncation=True, padding=True, return_tensors="pt")
            out = model.generate(
                **{k: v.to(device) for k, v in enc.items()},
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
            answers.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
            on_batch(len(chunk))
    return answers


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= SAMPLE_TEXT_CHARS:
        return text
    return text[: SAMPLE_TEXT_CHARS - 1] + "…"


def evaluate_adapters(
    eval_set: Sequence[Example],
    hp: Hyperparameters,
    options: EvaluationSettings,
    candidate: tuple[str, Path],
    served: tuple[str, Path] | None,
    observer: TrainingObserver,
    stop: threading.Event,
) -> Evaluation:
    """Loss, chrF and exact match of the candidate and (if given) the served adapter, plus probe answers.

    Returns what it has when `stop` is set; the caller checks `stop` and discards it.
    """
    from peft import PeftModel
    from transformers import DataCollatorForSeq2Seq

    from homeiq_trainer.training.batching import token_budget_batches
    from homeiq_trainer.training.engine import (
        LABEL_PAD,
        evaluate_loss,
        feature_lengths,
        load_base_model,
        pick_device,
        tokenize,
    )

    # fp32 weights: both adapters are scored exactly as the training run scores its held-out loss.
    tokenizer, base = load_base_model(hp.base_model, pick_device(hp.device), bf16_weights=False)
    model = PeftModel.from_pretrained(base, str(candidate[1]), adapter_name="candidate")
    names = {"candidate": candidate[0]}
    unreadable: str | None = None
    if served is not None:
        try:
            model.load_adapter(str(served[1]), adapter_name="served")
            names["served"] = served[0]
        except Exception as exc:  # whatever a damaged or foreign adapter makes peft raise
            # Judged as if none were in use: a served adapter that cannot be loaded must not keep
            # failing, or keeping, every later run.
            unreadable = f"{served[0]} in use cannot be loaded ({type(exc).__name__}: {first_line(exc)[:200]})"
            _LOGGER.warning("Not comparing with %s", unreadable)
            served = None

    def tokenized(n: int) -> None:  # a large held-out set takes a while: each chunk shows it is alive
        if n < len(eval_set):
            observer.phase(Phase.EVALUATING, f"tokenized {n} of {len(eval_set)} held-out examples")

    features = tokenize(tokenizer, eval_set, hp.source_max_tokens, hp.target_max_tokens, tokenized)
    observer.phase(Phase.EVALUATING, f"{len(eval_set)} held-out examples, {len(names)} adapter(s)")
    batches = token_budget_batches(feature_lengths(features), hp.batch_tokens, hp.batch_size, random.Random(hp.seed))
    padder = DataCollatorForSeq2Seq(tokenizer, model=base, padding=True, label_pad_token_id=LABEL_PAD)
    scored = list(eval_set[: options.max_generate_examples])
    probes = list(options.probe_queries) or [ex.instruction for ex in eval_set[:DEFAULT_PROBES]]
    total = len(names) * (len(batches) + len(scored) + len(probes))
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        if stop.is_set():
            raise _Stopped
        done += n
        # Progress keeps the daemon's stall timeout from mistaking a long generation for a hang.
        observer.progress(
            ProgressEvent(step=done, total_steps=max(total, 1), epoch=float(hp.epochs), phase=Phase.EVALUATING)
        )

    scores: dict[str, AdapterScores] = {name: AdapterScores(run_id=run_id) for name, run_id in names.items()}
    answers: dict[str, list[str]] = {name: [""] * len(probes) for name in names}
    try:
        for name, score in scores.items():
            model.set_adapter(name)
            score.eval_loss = evaluate_loss(model, features, padder, batches, on_batch=lambda _done, _n: advance(1))
            sources = [ex.instruction for ex in scored]
            predictions = generate(model, tokenizer, sources, hp.source_max_tokens, options.max_new_tokens, advance)
            score.chrf, score.exact_match = text_scores(predictions, [ex.response for ex in scored])
            score.generated = len(predictions)
            answers[name] = generate(model, tokenizer, probes, hp.source_max_tokens, options.max_new_tokens, advance)
    except _Stopped:
        _LOGGER.info("Evaluation stopped on request")
    samples = [
        {
            "query": _clip(query),
            "in_use": _clip(answers["served"][i]) if served else None,
            "candidate": _clip(answers["candidate"][i]),
        }
        for i, query in enumerate(probes)
    ]
    return Evaluation(len(eval_set), scores["candidate"], scores.get("served"), unreadable, samples=samples)


def answer(run_dir: Path, query: str, source_max_tokens: int, max_new_tokens: int) -> str:
    """What the adapter in `run_dir` answers to `query` (greedy), on the base model its config names."""
    import json

    from peft import PeftModel

    from homeiq_trainer.training.engine import load_base_model, pick_device

    config = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    _, base = load_base_model(config["base_model_name_or_path"], pick_device("auto"), bf16_weights=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = PeftModel.from_pretrained(base, str(run_dir))
    return generate(model, tokenizer, [query], source_max_tokens, max_new_tokens, lambda _n: None)[0]
