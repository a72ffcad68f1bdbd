"""The daemon's command path in-process, with fake training processes: idempotency, start checks,
the instance lock and what `start()` gives back when it fails. No broker, no torch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.jobs import InstanceBusy
from homeiq_trainer.messages import Phase, PhaseEvent, RunMetadata
from homeiq_trainer.training import artifacts

from .conftest import SettingsFactory, wait_idle
from .fakes import FakeLauncher

HANG = [PhaseEvent(phase=Phase.TRAINING), "hang", "result"]


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher(HANG)


@pytest.fixture
def app(make_settings: SettingsFactory, launcher: FakeLauncher) -> Iterator[TrainerApp]:
    a = TrainerApp(make_settings(daemon={"stop_timeout_s": 2}), launcher=launcher)
    a.start(connect=False)
    yield a
    a.stop()


def ask(app: TrainerApp, body: dict[str, Any] | bytes) -> dict[str, Any]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return json.loads(app.handle_command(payload))


def test_same_id_same_content_gets_the_same_answer_and_one_run(app: TrainerApp, launcher: FakeLauncher) -> None:
    body = {"action": "start", "request_id": "nightly-1", "params": {"epochs": 2}}
    first = ask(app, body)
    assert first["status"] == "ok"
    # Key order and whitespace are not content.
    again = ask(app, b'{"params": {"epochs": 2},   "request_id": "nightly-1", "action": "start"}')
    assert again == first
    assert len(app.store.recent(10)) == 1


def test_a_request_id_is_remembered_for_the_day_not_for_ever(app: TrainerApp, launcher: FakeLauncher) -> None:
    """An automation sending the same id every night got the first night's answer every night, no run."""
    now = [1_000.0]
    app.memory.clock = lambda: now[0]
    body = {"action": "start", "request_id": "nightly"}
    first = ask(app, body)
    assert first["status"] == "ok"
    app.runner.cancel()
    wait_idle(app)
    now[0] += 20 * 3600 - 1
    assert ask(app, body) == first  # a retry within the day: the same answer, no run
    now[0] += 2
    tomorrow = ask(app, body)
    assert tomorrow["status"] == "ok" and tomorrow["data"]["run_id"] != first["data"]["run_id"]
    assert len(launcher.started) == 2


def test_same_id_other_content_is_a_conflict_and_does_nothing(app: TrainerApp) -> None:
    started = ask(app, {"action": "start", "request_id": "r-1"})
    assert started["status"] == "ok"
    cancel = ask(app, {"action": "cancel", "request_id": "r-1"})
    assert cancel["error"]["code"] == "request_id_conflict" and "'start'" in cancel["error"]["message"]
    other_params = ask(app, {"action": "start", "request_id": "r-1", "params": {"epochs": 3}})
    assert other_params["error"]["code"] == "request_id_conflict"
    assert app.runner.active is not None and not app.runner.active.cancel_requested.is_set()
    # The conflict itself is not remembered: the original is still replayed.
    assert ask(app, {"action": "start", "request_id": "r-1"}) == started


def test_temporary_refusals_are_not_replayed(app: TrainerApp) -> None:
    ask(app, {"action": "start", "request_id": "first"})
    busy = ask(app, {"action": "start", "request_id": "nightly"})
    assert busy["error"]["code"] == "busy"
    nothing = ask(app, {"action": "cancel", "request_id": "c-1"})
    assert nothing["status"] == "ok"
    wait_idle(app)
    retry = ask(app, {"action": "start", "request_id": "nightly"})
    assert retry["status"] == "ok" and retry["data"]["run_id"] != busy["data"]["run_id"]


def test_deterministic_refusals_are_remembered(app: TrainerApp) -> None:
    invalid = ask(app, {"action": "start", "request_id": "bad-1", "params": {"epochs": 0}})
    assert invalid["error"]["code"] == "invalid_command"
    assert ask(app, {"action": "start", "request_id": "bad-1", "params": {"epochs": 0}}) == invalid
    assert ask(app, {"action": "status", "request_id": "bad-1"})["error"]["code"] == "request_id_conflict"
    refused = ask(app, {"action": "start", "request_id": "bad-2", "params": {"base_model": "evil/model"}})
    assert refused["error"]["code"] == "base_model_not_allowed"
    assert ask(app, {"action": "start", "request_id": "bad-2"})["error"]["code"] == "request_id_conflict"
    assert app.runner.active is None


def test_a_refusal_of_the_served_adapters_base_is_judged_again_after_a_promote(app: TrainerApp) -> None:
    """`resume_from: latest` names whatever is served: its refusal was replayed for 20 hours after a promote."""
    output_dir = app.settings.storage.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    for run_id, base in (
        ("run_20260101_000000", "retired/model"),
        ("run_20260102_000000", app.settings.training.base_model),
    ):
        run_dir = output_dir / run_id
        run_dir.mkdir()
        (run_dir / "adapter_config.json").write_text("{}")
        (run_dir / artifacts.ADAPTER_WEIGHTS).write_bytes(b"")
        artifacts.write_metadata(run_dir, RunMetadata(run_id=run_id, base_model=base))
    artifacts.promote(output_dir, "run_20260101_000000")
    body = {"action": "start", "request_id": "resume-1", "params": {"resume_from": "latest"}}
    assert ask(app, body)["error"]["code"] == "base_model_not_allowed"
    artifacts.promote(output_dir, "run_20260102_000000")
    assert ask(app, body)["status"] == "ok"
    # A base_model outside the allow-list depends on the command alone: still remembered.
    refused = ask(app, {"action": "start", "request_id": "r-2", "params": {"base_model": "evil/model"}})
    assert ask(app, {"action": "start", "request_id": "r-2", "params": {"base_model": "evil/model"}}) == refused


@pytest.mark.parametrize("request_id", ["\ud800", "ok\udfff", "x" * 129, "a b", "é"])
def test_malformed_request_ids_still_get_a_serialisable_answer(app: TrainerApp, request_id: str) -> None:
    payload = json.dumps({"action": "status", "request_id": request_id}).encode()  # ensure_ascii: \ud800 escaped
    response = ask(app, payload)
    assert response["status"] == "error" and response["error"]["code"] == "invalid_command"
    assert response["request_id"] is None
    payload = json.dumps({"action": "start", "request_id": "fine", "params": {"base_model": request_id}}).encode()
    elsewhere = ask(app, payload)  # the id is fine, a value elsewhere is not
    assert elsewhere["request_id"] == "fine"
    assert elsewhere["error"]["code"] in ("invalid_command", "base_model_not_allowed")


def test_min_new_samples_above_max_samples_is_clamped_and_said(
    make_settings: SettingsFactory, launcher: FakeLauncher
) -> None:
    app = TrainerApp(make_settings(data={"max_samples": 50}), launcher=launcher)
    app.start(connect=False)
    try:
        response = ask(app, {"action": "start", "params": {"min_new_samples": 100_000}})
        assert response["status"] == "ok", response
        assert response["data"]["required"] == 50 and response["data"]["new_samples"] == 50
        assert "above data.max_samples (50)" in response["data"]["notice"]
    finally:
        app.stop()


def test_runs_answer_is_refreshed_when_a_run_ends(app: TrainerApp) -> None:
    assert ask(app, {"action": "runs"})["data"]["runs"] == []
    run_id = ask(app, {"action": "start"})["data"]["run_id"]
    ask(app, {"action": "cancel"})
    wait_idle(app)
    runs = ask(app, {"action": "runs"})["data"]["runs"]
    assert [(r["run_id"], r["status"]) for r in runs] == [(run_id, "cancelled")]


def test_lock_guards_the_output_dir_too(make_settings: SettingsFactory, tmp_path: Path) -> None:
    first = TrainerApp(make_settings())
    first.start(connect=False)
    try:
        # Another history, the same output dir: it would delete the first one's staging directory.
        second = TrainerApp(make_settings(storage={"history_db": str(tmp_path / "other.db")}))
        with pytest.raises(InstanceBusy, match="out"):
            second.start(connect=False)
    finally:
        first.stop()
    second.start(connect=False)
    second.stop()


def test_a_failed_start_gives_everything_back(make_settings: SettingsFactory, tmp_path: Path) -> None:
    blocked = tmp_path / "history-is-a-dir.db"
    blocked.mkdir()
    app = TrainerApp(make_settings(storage={"history_db": str(blocked)}))
    with pytest.raises(Exception, match="unable to open|database"):
        app.start(connect=False)
    # Neither lock is left behind: the same output dir starts at once.
    again = TrainerApp(make_settings())
    again.start(connect=False)
    again.stop()
