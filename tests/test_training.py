"""A real tiny training run end to end: artifacts, metadata, history, `latest`, losses, cancel, resume."""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from homeiq_trainer.history import HistoryStore
from homeiq_trainer.jobs import JobRequest, open_run, recover
from homeiq_trainer.messages import Phase, ProgressEvent, RunStatus, TrainParams
from homeiq_trainer.promotion import conclude
from homeiq_trainer.training import artifacts
from homeiq_trainer.training.data import load_examples
from homeiq_trainer.training.evaluate import split_examples
from homeiq_trainer.training.run import execute_run

from .conftest import SettingsFactory
from .losses import independent_token_loss


class Recorder:
    def __init__(self, stop_at_step: int | None = None, stop: threading.Event | None = None) -> None:
        self.phases: list[Phase] = []
        self.progress_events: list[ProgressEvent] = []
        self.evaluation_events: list[ProgressEvent] = []
        self.stop_at_step = stop_at_step
        self.stop = stop

    def phase(self, phase: Phase, message: str = "") -> None:
        self.phases.append(phase)

    def progress(self, event: ProgressEvent) -> None:
        if self.phases and self.phases[-1] is Phase.EVALUATING and Phase.SAVING in self.phases:
            self.evaluation_events.append(event)
            return
        self.progress_events.append(event)
        if self.stop is not None and self.stop_at_step is not None and event.step >= self.stop_at_step:
            self.stop.set()


def run_job(settings, params: TrainParams | None = None, observer=None, stop=None):
    store = HistoryStore(settings.storage.history_db)
    recover(store, settings)
    row = open_run(store, settings, JobRequest(params=params or TrainParams(), triggered_by="test"))
    store.mark_running(row.id)
    result = execute_run(settings, params or TrainParams(), row.run_identifier, observer, stop)
    row = conclude(store, settings, row, result)
    return store, row, result


def test_end_to_end_run_writes_everything_and_agrees(make_settings: SettingsFactory) -> None:
    settings = make_settings(training={"epochs": 2})
    recorder = Recorder()
    store, row, result = run_job(settings, observer=recorder)
    out = settings.storage.output_dir

    assert result.status is RunStatus.COMPLETED, result.error
    run_dir = out / row.run_identifier
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_run.json", "tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert os.readlink(out / "latest") == row.run_identifier
    assert not list(out.glob(".staging-*")) and not list(out.glob(".trainer-*"))

    meta = json.loads((run_dir / "training_run.json").read_text())
    for key in (
        "base_model",
        "samples_used",
        "epochs",
        "learning_rate",
        "run_directory",
        "trained_at",
        "final_loss",
        "run_id",
        "eval_loss",
        "train_runtime_s",
        "train_samples_per_second",
        "data",
        "hyperparameters",
    ):
        assert key in meta, key
    # History row and metadata agree.
    assert row.status == "completed" and row.finished_at is not None
    assert row.dataset_size == meta["samples_used"] == result.data.examples == 175
    assert meta["train_examples"] + meta["eval_examples"] == meta["samples_used"]
    # The held-out split comes from the content: the same examples, recomputed here, whatever the run.
    examples, _ = load_examples(settings.data.source_db, settings.data.max_samples)
    _, held_out = split_examples(examples, 0.1, 20)
    assert meta["eval_examples"] == len(held_out) and 8 <= len(held_out) <= 30
    assert row.final_loss == pytest.approx(meta["final_loss"])
    assert row.eval_loss == pytest.approx(meta["eval_loss"])
    assert row.metadata_path == str(run_dir / "training_run.json")
    assert row.iteration_history_json == meta["loss_history"] and len(meta["loss_history"]) >= 2
    assert meta["data"]["skipped"] and sum(meta["data"]["skipped"].values()) == 25
    assert meta["hyperparameters"]["lora_r"] == 16 and meta["epochs"] == 2

    assert recorder.phases[:2] == [Phase.LOADING_DATA, Phase.LOADING_MODEL]
    assert Phase.TRAINING in recorder.phases and recorder.phases[-2:] == [Phase.SAVING, Phase.EVALUATING]
    # Evaluation reports progress too (generation can be slow), up to its own total.
    assert (
        recorder.evaluation_events and recorder.evaluation_events[-1].step == recorder.evaluation_events[-1].total_steps
    )
    # ... marked as the scoring's, which the daemon keeps out of the run's progress.
    assert {e.phase for e in recorder.evaluation_events} == {Phase.EVALUATING}
    assert {e.phase for e in recorder.progress_events} == {Phase.TRAINING}
    # The heartbeats of a held-out evaluation during training repeat the last step's loss, rate and ETA
    # (before: none of them, so those sensors turned unknown on every evaluation).
    after_first = recorder.progress_events[[e.loss is not None for e in recorder.progress_events].index(True) :]
    assert all(None not in (e.loss, e.samples_per_s, e.eta_s) for e in after_first)
    steps = [e.step for e in recorder.progress_events]
    assert steps == sorted(steps) and steps[-1] == recorder.progress_events[-1].total_steps
    assert result.padding_efficiency is not None and result.padding_efficiency > 0.7

    # The stored eval loss is the true mean per-token loss of the saved adapter on the held-out split.
    pairs = [(e.instruction, e.response) for e in held_out]
    assert independent_token_loss(settings.training.base_model, pairs, adapter=run_dir) == pytest.approx(
        result.eval_loss, rel=1e-4
    )
    # Losses went down: the last logged window is below the first.
    assert meta["loss_history"][-1]["loss"] < meta["loss_history"][0]["loss"]


def test_adapter_loads_with_peft_and_generates(make_settings: SettingsFactory) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    settings = make_settings()
    _, row, result = run_job(settings)
    assert result.status is RunStatus.COMPLETED
    latest = settings.storage.output_dir / "latest"
    tokenizer = AutoTokenizer.from_pretrained(latest)
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(settings.training.base_model), latest)
    ids = tokenizer("Turn on the porch light at sunset", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[-1] > 1
    assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)


def test_reported_loss_is_per_token_under_gradient_accumulation(make_settings: SettingsFactory) -> None:
    # With the smallest learning rate the schema allows (a few Adam steps of 1e-6 move the loss far
    # less than the tolerance) and no dropout the model is effectively frozen, so the
    # epoch's training loss must equal the independent per-token loss over the training split,
    # not that figure multiplied by the accumulation steps.
    settings = make_settings(
        training={"batch_size": 2, "gradient_accumulation_steps": 4, "learning_rate": 1e-6, "precision": "fp32"},
        lora={"dropout": 0.0},
        data={"max_samples": 60},
    )
    _, _, result = run_job(settings)
    assert result.status is RunStatus.COMPLETED
    examples, _ = load_examples(settings.data.source_db, 60)
    train, _ = split_examples(examples, 0.1, 20)
    expected = independent_token_loss(settings.training.base_model, [(e.instruction, e.response) for e in train])
    assert result.final_loss == pytest.approx(expected, rel=1e-3)


def test_early_stopping_keeps_the_adapter_with_the_best_held_out_loss(make_settings: SettingsFactory) -> None:
    # A learning rate far too high makes the held-out loss worse after a few steps, so training stops early.
    settings = make_settings(
        training={"epochs": 30, "eval_every_steps": 1, "early_stopping_patience": 2, "learning_rate": 1.0},
        lora={"dropout": 0.0},
        data={"max_samples": 80},
    )
    _, row, result = run_job(settings)
    assert result.status is RunStatus.COMPLETED, result.error
    meta = json.loads((Path(result.run_dir or "") / "training_run.json").read_text())
    history = meta["eval_history"]
    assert meta["stopped_early"] and len(history) == meta["steps"] < 30 * 2
    best = min(history, key=lambda e: e["eval_loss"])
    assert [e["eval_loss"] > best["eval_loss"] for e in history[-2:]] == [True, True]
    assert meta["best_step"] == best["step"] and result.eval_loss == pytest.approx(best["eval_loss"])
    assert [e["elapsed_s"] for e in history] == sorted(e["elapsed_s"] for e in history)
    # The saved adapter is the best one, not the last.
    examples, _ = load_examples(settings.data.source_db, settings.data.max_samples)
    _, held_out = split_examples(examples, 0.1, 20)
    pairs = [(e.instruction, e.response) for e in held_out]
    saved = independent_token_loss(settings.training.base_model, pairs, adapter=Path(result.run_dir or ""))
    assert saved == pytest.approx(best["eval_loss"], rel=1e-4)  # held-out losses are fp32 in any precision
    # Peak memory is recorded in the metadata and the history.
    assert meta["peak_rss_mb"] > 50 and row.peak_rss_mb == meta["peak_rss_mb"] == result.peak_rss_mb


def test_training_is_freed_before_evaluation_and_the_recorded_peak_covers_both(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 4 GB box runs out at the run's highest point, which may come after training: the evaluation
    # loads a base model of its own, and must not stack it on a trained one that is still alive.
    import psutil
    from peft import PeftModel

    from homeiq_trainer.training import evaluate
    from homeiq_trainer.training.engine import peak_rss_mb

    seen: dict[str, float] = {}
    real_evaluate = evaluate.evaluate_adapters

    def evaluate_adapters(*args: Any, **kwargs: Any) -> Any:
        seen["trained_models_alive"] = sum(isinstance(o, PeftModel) for o in gc.get_objects())
        # A high-water mark 64 MiB above the old one during evaluation, whatever earlier tests left in
        # this process. (Linux counts resident pages per thread in batches, so readings are approximate.)
        seen["peak_before_evaluation"] = peak_rss_mb()
        resident_mib = psutil.Process().memory_info().rss / 2**20
        ballast = b"\x01" * int((seen["peak_before_evaluation"] - resident_mib + 64) * 2**20)
        del ballast
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_adapters", evaluate_adapters)
    gc.disable()  # only the run's own collection may free the trained model
    try:
        _, row, result = run_job(make_settings())
    finally:
        gc.enable()
    assert result.status is RunStatus.COMPLETED, result.error
    assert seen["trained_models_alive"] == 0
    assert (result.peak_rss_mb or 0) >= seen["peak_before_evaluation"] + 32 and row.peak_rss_mb == result.peak_rss_mb


def test_cancel_stops_at_a_step_and_keeps_latest(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    _, first, ok = run_job(settings)
    assert ok.status is RunStatus.COMPLETED
    stop = threading.Event()
    recorder = Recorder(stop_at_step=2, stop=stop)
    store, row, result = run_job(settings, TrainParams(epochs=20), observer=recorder, stop=stop)
    assert result.status is RunStatus.CANCELLED
    assert row.status == "cancelled" and row.finished_at is not None
    assert max(e.step for e in recorder.progress_events) <= 3  # stopped at the next step boundary
    out = settings.storage.output_dir
    assert os.readlink(out / "latest") == first.run_identifier
    assert not (out / row.run_identifier).exists()
    # Training flushes subnormals to zero; the engine must give that processor-wide flag back.
    import torch

    assert torch.tensor([1e-40]).item() != 0.0


def test_cancel_while_the_run_is_written_up_keeps_nothing(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(data={"max_samples": 40})
    stop = threading.Event()
    write_metadata = artifacts.write_metadata

    def then_cancel(run_dir: Path, metadata: Any) -> Path:
        written = write_metadata(run_dir, metadata)
        stop.set()  # the cancel arrives after evaluation, before the directory is moved into place
        return written

    monkeypatch.setattr(artifacts, "write_metadata", then_cancel)
    _, row, result = run_job(settings, stop=stop)
    assert result.status is RunStatus.CANCELLED and row.status == "cancelled" and not row.promoted
    assert list(settings.storage.output_dir.iterdir()) == []  # no run directory, no staging, no `latest`


def test_resume_from_latest_and_refusals(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    _, first, ok = run_job(settings, TrainParams(lora_r=8))
    assert ok.status is RunStatus.COMPLETED
    _, second, resumed = run_job(settings, TrainParams(resume_from="latest"))
    assert resumed.status is RunStatus.COMPLETED, resumed.error
    meta = json.loads((settings.storage.output_dir / second.run_identifier / "training_run.json").read_text())
    assert meta["hyperparameters"]["resume_from"] == "latest"
    assert meta["hyperparameters"]["lora_r"] == 8  # the resumed adapter's shape, not the configured 16
    with pytest.raises(ValueError, match="come from the resumed adapter"):
        TrainParams(resume_from="latest", lora_r=4)
    # Resuming starts from the trained adapter, so its first loss is below the fresh run's first loss.
    first_meta = json.loads((settings.storage.output_dir / first.run_identifier / "training_run.json").read_text())
    assert meta["loss_history"][0]["loss"] < first_meta["loss_history"][0]["loss"]

    _, _, missing = run_job(settings, TrainParams(resume_from="run_19990101_000000"))
    assert missing.status is RunStatus.FAILED and "no complete adapter" in (missing.error or "")
    with pytest.raises(ValueError):
        TrainParams(resume_from="../../etc/passwd")


def test_failures_are_one_line_and_change_nothing(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings(data={"source_db": str(tmp_path / "missing.db")})
    _, row, result = run_job(settings)
    assert result.status is RunStatus.FAILED
    assert result.error == f"source database not found: {tmp_path / 'missing.db'}"
    assert row.status == "failed" and row.error_message == result.error and row.finished_at is not None
    assert not (settings.storage.output_dir / "latest").exists()

    bad_model = make_settings(training={"base_model": str(tmp_path / "no-model-here")})
    _, row, result = run_job(bad_model)
    assert result.status is RunStatus.FAILED and result.error and "\n" not in result.error


def test_unusable_model_files_and_targets_fail_the_run_in_one_line(
    make_settings: SettingsFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """A folder without tokenizer files trained to `completed` on an empty tokenizer (every word <unk>);
    corrupt weights and LoRA targets the model lacks ended with a traceback as the run's error."""
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, no_tokenizer / name)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")
    cases = [
        ({"training": {"base_model": str(no_tokenizer)}}, "examples' tokens as <unk>: are its tokenizer files"),
        ({"training": {"base_model": str(corrupt)}}, f"cannot load the base model {corrupt}: "),
        ({"lora": {"target_modules": ["nowhere"]}}, "lora.target_modules do not fit the base model"),
    ]
    for sections, expected in cases:
        settings = make_settings(**sections)
        _, row, result = run_job(settings, TrainParams(max_samples=40))
        assert result.status is RunStatus.FAILED, sections
        assert result.error and expected in result.error and "\n" not in result.error, result.error
        assert not (settings.storage.output_dir / "latest").exists()


def test_interrupted_runs_are_failed_on_start(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    store = HistoryStore(settings.storage.history_db)
    row = open_run(store, settings, JobRequest(params=TrainParams()))
    store.mark_running(row.id)
    staging = artifacts.staging_dir(settings.storage.output_dir, row.run_identifier)
    staging.mkdir(parents=True)
    (staging / "adapter_config.json").write_text("{}")
    interrupted = recover(store, settings)
    assert [r.run_identifier for r in interrupted] == [row.run_identifier]
    again = store.get(row.id)
    assert again.status == "failed" and "interrupted" in again.error_message and again.finished_at
    assert not staging.exists()


def test_retention_keeps_newest_and_latest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    names = [f"run_20250101_00000{i}" for i in range(6)] + ["run_20250101_000005_1"]
    for name in names:
        (out / name).mkdir(parents=True)
        for f in artifacts.REQUIRED_FILES:
            (out / name / f).write_text("{}")
    artifacts.promote(out, "run_20250101_000000")  # an old run is served
    removed = artifacts.apply_retention(out, keep=2)
    left = sorted(p.name for p in out.iterdir() if not p.is_symlink())
    assert left == ["run_20250101_000000", "run_20250101_000005", "run_20250101_000005_1"]
    assert sorted(removed) == sorted(names[1:5])


def test_promote_refuses_incomplete_and_identifiers_unique(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "run_20250101_000000").mkdir(parents=True)
    with pytest.raises(artifacts.ArtifactError):
        artifacts.promote(out, "run_20250101_000000")
    assert not (out / "latest").exists()
    from datetime import UTC, datetime

    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert artifacts.new_run_identifier({"run_20250101_000000"}, out, now) == "run_20250101_000000_1"
    # A clock set back: the new run still sorts after every run there is, so retention keeps it.
    (out / "run_20250301_120000_2").mkdir()
    earlier = artifacts.new_run_identifier({"run_20250101_000000"}, out, now)
    assert earlier == "run_20250301_120000_3"
    (out / earlier).mkdir()
    assert artifacts.apply_retention(out, 1) == ["run_20250301_120000_2", "run_20250101_000000"]
    with pytest.raises(artifacts.ArtifactError):
        artifacts.resolve_run_dir(out, "../../etc")


def test_token_budget_batches_fill_the_budget_with_little_padding() -> None:
    import math
    import random

    from homeiq_trainer.training.batching import TokenBudgetBatchSampler, padded_tokens, padding_efficiency

    rng = random.Random(0)
    # Long-tailed like real requests: most short, a few at the 256-token truncation limit.
    lengths = [
        (min(256, max(3, int(rng.lognormvariate(math.log(20), 0.5)))), min(256, int(rng.lognormvariate(3.8, 0.7)) + 3))
        for _ in range(1500)
    ] + [(30, 256)] * 5
    sampler = TokenBudgetBatchSampler(lengths, batch_tokens=1024, max_examples=64, seed=1)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(len(b) <= 64 and (len(b) == 1 or padded_tokens(lengths, b) <= 1024) for b in batches)
    assert padding_efficiency(lengths, batches) > 0.93
    assert max(len(b) for b in batches) > 4 * min(len(b) for b in batches)  # short examples make big batches
    # Same batches every epoch (the Trainer's step count holds), in a new order.
    sampler.set_epoch(1)
    again = list(sampler)
    assert sorted(map(sorted, again)) == sorted(map(sorted, batches)) and again != batches

    shuffled = TokenBudgetBatchSampler(lengths, batch_tokens=1024, max_examples=64, seed=1, group_by_length=False)
    assert padding_efficiency(lengths, list(shuffled)) < 0.7
    # A single example over the budget trains alone instead of failing.
    assert list(TokenBudgetBatchSampler([(300, 300), (5, 5)], 64, 8, seed=0)) in ([[0], [1]], [[1], [0]])


def test_token_budget_batches_shard_whole_batches_across_workers() -> None:
    from homeiq_trainer.training.batching import TokenBudgetBatchSampler

    lengths = [(5 + i % 40, 3 + i % 17) for i in range(400)]
    alone = TokenBudgetBatchSampler(lengths, batch_tokens=256, max_examples=16, seed=3)
    alone.set_epoch(2)
    whole = list(alone)
    for workers in (2, 3, len(whole) + 1):
        shards = []
        for rank in range(workers):
            sampler = TokenBudgetBatchSampler(lengths, 256, 16, seed=3, rank=rank, workers=workers)
            sampler.set_epoch(2)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler)
        # Same count on every worker (DDP steps in lockstep); every batch whole, each taken at least once,
        # and only the top-up of the last round taken twice.
        assert len({len(shard) for shard in shards}) == 1
        taken = [batch for shard in shards for batch in shard]
        assert all(batch in whole for batch in taken)
        assert {tuple(b) for b in taken} == {tuple(b) for b in whole}
        assert len(taken) - len(whole) == -len(whole) % workers
    with pytest.raises(ValueError, match="rank 2"):
        TokenBudgetBatchSampler(lengths, 256, 16, seed=3, rank=2, workers=2)


def test_history_from_an_older_release_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    # training_runs as the previous release created it: no peak_rss_mb.
    conn.execute(
        "CREATE TABLE training_runs (id INTEGER PRIMARY KEY, training_type VARCHAR(20), status VARCHAR(20), "
        "started_at DATETIME, finished_at DATETIME, dataset_size INTEGER, base_model VARCHAR, output_dir VARCHAR, "
        "run_identifier VARCHAR, final_loss FLOAT, error_message TEXT, metadata_path VARCHAR, triggered_by VARCHAR, "
        "iteration_history_json JSON, eval_loss FLOAT, request_id VARCHAR, parameters_json JSON, data_report_json JSON)"
    )
    conn.execute(
        "INSERT INTO training_runs (status, started_at, run_identifier, triggered_by, training_type) "
        "VALUES ('completed', '2025-01-01 00:00:00', 'run_old', 'admin', 'soft_prompt')"
    )
    conn.commit()
    conn.close()
    store = HistoryStore(path)
    old = store.by_identifier("run_old")
    assert old is not None and old.peak_rss_mb is None
    done = store.finish(old.id or 0, RunStatus.COMPLETED, peak_rss_mb=512.5)
    assert done.peak_rss_mb == 512.5
    store.close()


def test_cpu_bf16_rounds_lengths_to_repeat_shapes_and_trains_without_flash_attention(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bf16 on a CPU: lengths padded to a multiple of 8 and linear layers' rows to a multiple of 32
    # (oneDNN builds and keeps a kernel per new bf16 shape), and the plain attention, whose bf16 backward
    # is fast where flash attention's is not. fp32 keeps all three as they are.
    import torch

    from homeiq_trainer.training.session import CPU_BF16_PAD_MULTIPLE, CPU_BF16_ROW_MULTIPLE

    attention, linear = torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.linear
    calls: list[tuple[int, int, bool]] = []  # (query length, key length, flash allowed) of training calls
    # (rows, trainable, under autocast) of every linear layer's call in training forward passes
    rows: list[tuple[int, bool, bool]] = []

    def watched(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled():  # evaluations run forward passes in fp32, whatever the training's precision
            calls.append((query.shape[-2], key.shape[-2], torch.backends.cuda.flash_sdp_enabled()))
        return attention(query, key, *args, **kwargs)

    def watched_linear(x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            rows.append((math.prod(x.shape[:-1]), weight.requires_grad, torch.is_autocast_enabled("cpu")))
        return linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", watched)
    monkeypatch.setattr(torch.nn.functional, "linear", watched_linear)
    seen = {}
    for precision in ("bf16", "fp32"):
        calls.clear()
        rows.clear()
        settings = make_settings(training={"precision": precision}, data={"max_samples": 24})
        _, _, result = run_job(settings)
        assert result.status is RunStatus.COMPLETED, result.error
        seen[precision] = (list(calls), list(rows))
    (bf16, bf16_rows), (fp32, fp32_rows) = seen["bf16"], seen["fp32"]
    assert bf16 and not any(flash for _, _, flash in bf16)
    assert {length % CPU_BF16_PAD_MULTIPLE for call in bf16 for length in call[:2]} == {0}
    frozen_rows = [r for r, trainable, _ in bf16_rows if not trainable]
    assert frozen_rows and {r % CPU_BF16_ROW_MULTIPLE for r in frozen_rows} == {0}
    # LoRA's own small multiplies run in fp32, outside autocast (a oneDNN bf16 call cost them 2-3x).
    adapter_calls = [under_autocast for _, trainable, under_autocast in bf16_rows if trainable]
    assert adapter_calls and not any(adapter_calls)
    # fp32 trains on exact lengths and row counts, with flash attention allowed.
    assert fp32 and all(flash for _, _, flash in fp32)
    assert {length % CPU_BF16_PAD_MULTIPLE for call in fp32 for length in call[:2]} != {0}
    assert fp32_rows and {r % CPU_BF16_ROW_MULTIPLE for r, _, _ in fp32_rows} != {0}


def test_progress_counts_from_training_not_from_loading(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading and tokenizing were counted as training: their seconds, multiplied by every step still to
    go, put the first ETA in the hours for a run of minutes; and tokenizing the held-out set counted from 0."""
    import time

    from homeiq_trainer.training import engine

    real_load = engine.load_base_model

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        time.sleep(5.0)  # a big base model from a slow disk
        return real_load(*args, **kwargs)

    monkeypatch.setattr(engine, "load_base_model", slow_load)
    messages: list[str] = []

    class Messages(Recorder):
        def phase(self, phase: Phase, message: str = "") -> None:
            super().phase(phase, message)
            messages.append(message)

    observer = Messages()
    settings = make_settings(training={"batch_size": 2, "batch_tokens": 64}, data={"max_samples": 60})
    _, _, result = run_job(settings, observer=observer)
    assert result.status is RunStatus.COMPLETED
    first = next(e for e in observer.progress_events if e.eta_s is not None)
    # The load alone would have added 5 s for each step to go; a step of this model takes milliseconds.
    assert first.eta_s < 2.5 * (first.total_steps - first.step), first
    counts = [int(m.split()[1]) for m in messages if m.startswith("tokenized ")]
    assert counts == sorted(counts) and counts[-1] == 60, counts


@pytest.mark.parametrize("path", ["/nonexistent-model", "./nonexistent-model", "~/nonexistent-model"])
def test_a_base_model_folder_that_is_not_there_is_named(path: str) -> None:
    """transformers took it for a hub id: 'Repo id must use alphanumeric chars'."""
    from homeiq_trainer.training.engine import RunInputError, load_base_model

    with pytest.raises(RunInputError, match=f"cannot load the base model {re.escape(path)}: no such directory"):
        load_base_model(path, "cpu", False)
