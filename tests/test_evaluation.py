"""The held-out split, the candidate-vs-served measurements, and the promotion decision."""

from __future__ import annotations

import json
import math
import random
import unicodedata
from pathlib import Path

import pytest

from homeiq_trainer.history import HistoryStore
from homeiq_trainer.jobs import JobRequest, open_run, recover
from homeiq_trainer.messages import Decision, RunStatus, TrainParams
from homeiq_trainer.promotion import conclude, decide
from homeiq_trainer.settings import PromotionSettings
from homeiq_trainer.training import artifacts
from homeiq_trainer.training.data import Example, load_examples
from homeiq_trainer.training.evaluate import held_out, split_examples
from homeiq_trainer.training.run import execute_run

from .conftest import SettingsFactory


def _examples(n: int) -> list[Example]:
    return [Example(instruction=f"Turn on light number {i}", response=f"light.{i}", created_at=None) for i in range(n)]


def test_split_is_chosen_by_content_not_by_order_or_run() -> None:
    examples = _examples(400)
    train, held = split_examples(examples, 0.1, 20)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 400
    shuffled = examples[:]
    random.Random(7).shuffle(shuffled)
    _, held_again = split_examples(shuffled, 0.1, 20)
    assert {e.instruction for e in held_again} == {e.instruction for e in held}
    # A subset (fewer rows next time) keeps its members on the same side.
    _, held_subset = split_examples(examples[:200], 0.1, 20)
    assert {e.instruction for e in held_subset} == {e.instruction for e in held if int(e.response[6:]) < 200}
    # The same words in another case or spacing are the same example.
    respaced = [
        Example(instruction=f"  {e.instruction.upper()} ", response=e.response, created_at=None) for e in examples
    ]
    assert [e.response for e in split_examples(respaced, 0.1, 20)[1]] == [e.response for e in held]
    # And in another Unicode form, as T5's tokenizer reads them (before: 28 of 200 such pairs split).
    nfc = [Example(f"Schalte das Licht in der Küche {i} aus", "r", None) for i in range(200)]
    nfd = [Example(unicodedata.normalize("NFD", e.instruction), "r", None) for e in nfc]
    assert all(a.instruction != b.instruction for a, b in zip(nfc, nfd, strict=True))
    assert [held_out(e, 0.1) for e in nfc] == [held_out(e, 0.1) for e in nfd]
    assert split_examples(examples, 0.0, 20) == (examples, [])
    assert split_examples(examples[:1], 0.99, 20) == (examples[:1], [])  # nothing else to train on


def test_a_run_too_small_to_evaluate_never_trains_on_what_later_runs_hold_out() -> None:
    """The first run on a new install (19 examples) trained on all of them and was served; the next,
    larger run held some of those out and judged that adapter on examples it had learned."""
    examples = _examples(400)
    first_train, first_held = split_examples(examples[:19], 0.1, 20)
    assert first_held == [] and 0 < len(first_train) < 19
    _, later_held = split_examples(examples, 0.1, 20)
    assert later_held and not {e.instruction for e in first_train} & {e.instruction for e in later_held}


def test_an_adapter_trained_with_a_smaller_eval_fraction_is_judged_on_what_it_did_not_see(
    make_settings: SettingsFactory,
) -> None:

    settings = make_settings(evaluation={"max_generate_examples": 4, "max_new_tokens": 4})
    store, first, _ = _run(settings)
    assert first.promoted
    wider = make_settings(data={"eval_fraction": 0.3}, evaluation={"max_generate_examples": 4, "max_new_tokens": 4})
    _, _, result = _run(wider)
    examples, _ = load_examples(settings.data.source_db, settings.data.max_samples)
    _, held_now = split_examples(examples, 0.3, settings.data.min_eval_examples)
    unseen = [e for e in held_now if held_out(e, 0.1)]
    assert 0 < len(unseen) < len(held_now)
    # Both adapters on the examples the first never trained on, not on the 30% it partly learned.
    assert result.evaluation["served"]["run_id"] == first.run_identifier
    assert result.evaluation["eval_examples"] == len(unseen)


def test_an_adapter_continued_from_one_with_a_smaller_eval_fraction_is_judged_on_what_neither_saw(
    make_settings: SettingsFactory,
) -> None:
    """B continued A (eval_fraction 0.1) with 0.3, so B learned through A most of its own 30% held out:
    the next run was compared with B on examples B had learned, which favours the adapter in use."""
    from homeiq_trainer.training.run import LINEAGE_KEY

    quick = {"max_generate_examples": 4, "max_new_tokens": 4}
    _run(make_settings(evaluation=quick, promotion={"policy": "always"}))
    wider = make_settings(data={"eval_fraction": 0.3}, evaluation=quick, promotion={"policy": "always"})
    _, resumed, on_parent = _run(wider, TrainParams(resume_from="latest"))
    assert resumed.promoted and on_parent.evaluation["served"]["run_id"] != resumed.run_identifier
    assert artifacts.read_metadata(Path(on_parent.run_dir)).hyperparameters[LINEAGE_KEY] == 0.1
    examples, _ = load_examples(wider.data.source_db, wider.data.max_samples)
    _, held_now = split_examples(examples, 0.3, wider.data.min_eval_examples)
    unseen = [e for e in held_now if held_out(e, 0.1)]
    assert 0 < len(unseen) < len(held_now)
    assert on_parent.evaluation["eval_examples"] == len(unseen)  # the resumed run itself, beside A
    _, _, after = _run(wider)  # a fresh run with 0.3, beside B
    assert after.evaluation["served"]["run_id"] == resumed.run_identifier
    assert after.evaluation["eval_examples"] == len(unseen)  # before: all of held_now


POLICY = PromotionSettings()
BY_LOSS = PromotionSettings(metric="eval_loss")


@pytest.mark.parametrize(
    ("options", "candidate", "served", "served_run", "expected", "reason"),
    [
        (POLICY, {"chrf": 41.2}, {"chrf": 43.0}, "run_a", Decision.KEPT_CURRENT, "chrF 41.2 vs 43.0 in use"),
        (POLICY, {"chrf": 44.0}, {"chrf": 43.0}, "run_a", Decision.PROMOTED, "chrF 44.0 vs 43.0 in use"),
        (POLICY, {"chrf": 43.0}, {"chrf": 43.0}, "run_a", Decision.KEPT_CURRENT, "chrF 43.0 vs 43.0 in use"),
        (PromotionSettings(min_improvement=2), {"chrf": 44.0}, {"chrf": 43.0}, "run_a", Decision.KEPT_CURRENT, "+2"),
        (POLICY, {"chrf": 1.0}, None, None, Decision.PROMOTED, "no adapter was in use"),
        (POLICY, {"chrf": 1.0}, None, "run_a", Decision.PROMOTED, "another base model"),
        (POLICY, {"chrf": None}, {}, "run_a", Decision.KEPT_CURRENT, "no held-out"),
        (PromotionSettings(metric="eval_loss"), {"eval_loss": 2.0}, {"eval_loss": 2.5}, "r", Decision.PROMOTED, "2.0"),
        (
            PromotionSettings(metric="eval_loss"),
            {"eval_loss": 3.0},
            {"eval_loss": 2.5},
            "r",
            Decision.KEPT_CURRENT,
            "eval loss 3.0 vs 2.5 in use",
        ),
        # Weights gone NaN in use scored NaN, which no gain beats: every later run was kept out for good.
        (BY_LOSS, {"eval_loss": 3.0}, {"eval_loss": math.nan}, "r", Decision.PROMOTED, "no finite"),
        (BY_LOSS, {"eval_loss": 3.0}, {"eval_loss": math.inf}, "r", Decision.PROMOTED, "no finite"),
        (PromotionSettings(policy="always"), {"chrf": 1.0}, {"chrf": 43.0}, "r", Decision.PROMOTED, "always"),
        (
            PromotionSettings(policy="manual"),
            {"chrf": 99.0},
            {"chrf": 1.0},
            "r",
            Decision.AWAITING_APPROVAL,
            "approval",
        ),
    ],
)
def test_decide(options, candidate, served, served_run, expected, reason) -> None:
    decision, why = decide(options, candidate, served, served_run)
    assert decision is expected and reason in why and "\n" not in why


def _run(settings, params: TrainParams | None = None):
    store = HistoryStore(settings.storage.history_db)
    recover(store, settings)
    row = open_run(store, settings, JobRequest(params=params or TrainParams(), triggered_by="test"))
    store.mark_running(row.id)
    result = execute_run(settings, params or TrainParams(), row.run_identifier)
    row = conclude(store, settings, row, result)
    return store, row, result


def _independent_generations(base: Path, adapter: Path, sources: list[str], max_new_tokens: int) -> list[str]:
    """One example at a time, no padding, through plain transformers + peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base), str(adapter)).eval()
    out = []
    with torch.no_grad():
        for source in sources:
            ids = tokenizer(source, return_tensors="pt", truncation=True, max_length=256)
            generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            out.append(tokenizer.decode(generated[0], skip_special_tokens=True))
    return out


def test_candidate_and_served_measured_alike_and_metric_recomputed(make_settings: SettingsFactory) -> None:
    import sacrebleu

    settings = make_settings(evaluation={"max_generate_examples": 6, "max_new_tokens": 12}, training={"epochs": 2})
    store, first, result = _run(settings)
    assert result.status is RunStatus.COMPLETED and first.promoted and result.decision is Decision.PROMOTED
    out = settings.storage.output_dir
    meta = artifacts.read_metadata(out / first.run_identifier)
    candidate = meta.evaluation["candidate"]
    assert meta.evaluation["served"] is None and candidate["generated"] == 6

    # chrF recomputed independently: unbatched generations, sacrebleu's functional API.
    examples, _ = load_examples(settings.data.source_db, settings.data.max_samples)
    _, held = split_examples(examples, settings.data.eval_fraction, settings.data.min_eval_examples)
    predictions = _independent_generations(
        settings.training.base_model, out / first.run_identifier, [e.instruction for e in held[:6]], 12
    )
    references = [e.response for e in held[:6]]
    assert candidate["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score, abs=1e-3)
    exact = 100 * sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / 6
    assert candidate["exact_match"] == pytest.approx(exact)
    assert candidate["eval_loss"] == pytest.approx(result.eval_loss, rel=1e-4)
    assert len(meta.samples) == 5 and meta.samples[0]["in_use"] is None

    # The second run measures the adapter in use on the same examples, the same way.
    _, second, result2 = _run(settings, TrainParams(learning_rate=0.02))
    served = result2.evaluation["served"]
    assert served["run_id"] == first.run_identifier
    for key in ("chrf", "exact_match", "eval_loss"):
        assert served[key] == pytest.approx(candidate[key], rel=1e-4, abs=1e-6), key
    assert result2.decision_reason and "\n" not in result2.decision_reason
    assert all(sample["in_use"] is not None for sample in result2.samples)
    # History row, last_run record and training_run.json agree.
    row = store.by_identifier(second.run_identifier)
    assert row.decision == result2.decision.value and row.evaluation_json["served"]["run_id"] == first.run_identifier
    assert len(json.dumps(row.evaluation_json["samples"])) < 4000
    assert artifacts.read_metadata(out / second.run_identifier).decision_reason == row.decision_reason


def test_a_diverged_run_fails_and_its_result_survives_the_pipe(make_settings: SettingsFactory, monkeypatch) -> None:
    """A NaN loss once made the child's result unparsable ("exited with code 0 without a result")."""
    import math

    from homeiq_trainer.messages import EventEnvelope
    from homeiq_trainer.training import engine
    from homeiq_trainer.training.engine import TrainOutcome
    from homeiq_trainer.worker import parse_event

    def diverging(examples, hp, save_dir, **_kwargs) -> TrainOutcome:
        nan = math.nan
        history = [{"step": 1.0, "epoch": 0.5, "loss": 3.0}, {"step": 2.0, "epoch": 1.0, "loss": nan}]
        return TrainOutcome(False, 10, 2, nan, math.inf, history, 1.0, 1.0, 0.9, "cpu", 2)

    monkeypatch.setattr(engine, "train_adapter", diverging)
    settings = make_settings()
    result = execute_run(settings, TrainParams(), "run_20250101_000000")
    assert result.status is RunStatus.FAILED and result.error == "loss diverged"
    assert result.decision is Decision.NOT_PROMOTED_INVALID and not result.promoted
    line = EventEnvelope(event=result).model_dump_json()
    assert "NaN" not in line and "Infinity" not in line
    back = parse_event(line)
    assert back.status is RunStatus.FAILED and back.loss_history[1]["loss"] is None
    assert not (settings.storage.output_dir / "run_20250101_000000").exists()


def test_an_adapter_an_earlier_version_trained_on_every_example_is_not_compared_on_them(tmp_path: Path) -> None:
    """Small runs of earlier versions trained on all they had, held-out share recorded all the same."""
    from homeiq_trainer.messages import RunMetadata
    from homeiq_trainer.training.run import _unseen_by

    served = tmp_path / "run_20260101_000000"
    served.mkdir()
    meta = {"samples_used": 19, "train_examples": 19, "eval_examples": 0, "hyperparameters": {"eval_fraction": 0.1}}
    artifacts.write_metadata(served, RunMetadata(run_id=served.name, **meta))
    _, held = split_examples(_examples(400), 0.1, 20)
    kept, note = _unseen_by((served.name, served), held, 0.1)
    assert kept == [] and note is not None and "trained on every held-out example" in note
    # One that held its share out (this version's small runs too) is compared on all of them.
    artifacts.write_metadata(served, RunMetadata(run_id=served.name, **{**meta, "train_examples": 17}))
    assert _unseen_by((served.name, served), held, 0.1) == (held, None)
