"""Commands that meet a run or a count halfway, and messages on the settings topics, through a real broker."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from homeiq_trainer import dispatcher as dispatcher_module
from homeiq_trainer import runner as runner_module
from homeiq_trainer.app import TrainerApp
from homeiq_trainer.messages import Phase, PhaseEvent
from tests import postgres
from tests.fakes import FakeLauncher

from .conftest import Broker, SettingsFactory, on_test_broker, wait_idle
from .mqtt_client import Watcher

BASE = "homeiq/trainer"
CMD, RESP = f"{BASE}/command", f"{BASE}/response"


@pytest.fixture
def daemon(make_settings: SettingsFactory, broker: Broker) -> Iterator[Any]:
    """Starts a daemon with a fake training process; each is stopped afterwards."""
    apps: list[TrainerApp] = []

    def start(script: list[Any], **sections: dict[str, Any]) -> TrainerApp:
        app = TrainerApp(on_test_broker(make_settings, broker.port, **sections), launcher=FakeLauncher(script))
        app.start()
        apps.append(app)
        assert app.link.wait_connected(10)
        return app

    yield start
    for app in apps:
        app.stop()


def answers(watcher: Watcher, since: int, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(watcher.messages(RESP)) - since < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return [json.loads(raw) for raw in watcher.messages(RESP)[since:]]


@pytest.fixture
def slow_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new-data count that takes a second, as one over a large history does."""
    real = dispatcher_module.count_new_since_last_completed

    def slow(*args: Any) -> int:
        time.sleep(1.0)
        return real(*args)

    monkeypatch.setattr(dispatcher_module, "count_new_since_last_completed", slow)


def test_a_cancel_while_a_finished_run_is_recorded_is_refused_not_promised(
    daemon: Any, watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was answered `ok`, and the run ended `completed` all the same (and could be served)."""
    real, recording = runner_module.conclude, threading.Event()

    def slow_conclude(*args: Any, **kwargs: Any) -> Any:
        recording.set()
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "conclude", slow_conclude)
    app = daemon([PhaseEvent(phase=Phase.SAVING), "result"])
    run_id = watcher.request(CMD, RESP, {"action": "start"})["data"]["run_id"]
    assert recording.wait(10)
    cancel = watcher.request(CMD, RESP, {"action": "cancel"})
    assert cancel["status"] == "error" and cancel["error"]["code"] == "not_running"
    assert "has ended and is being recorded" in cancel["error"]["message"]
    last = watcher.wait_for(f"{BASE}/last_run", lambda v: v.get("run_id") == run_id, timeout=15)
    assert last["status"] == "completed" and app.runner.active is None


def _row_status(database: str, run_id: str) -> str:
    with postgres.connect(database) as conn:
        row = conn.execute("SELECT status FROM training_runs WHERE run_identifier = %s", (run_id,)).fetchone()
    assert row is not None
    return str(row[0])


@contextlib.contextmanager
def _history_gone(database: str) -> Iterator[None]:
    """The server turns everyone away from `database`, the daemon's open sessions too, until the block ends."""
    with postgres.connect() as conn:
        conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
    try:
        yield
    finally:
        with postgres.connect() as conn:
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')


@pytest.fixture
def pg_history_daemon(make_settings: SettingsFactory, broker: Broker) -> Iterator[tuple[TrainerApp, str]]:
    """A daemon whose history is a PostgreSQL database of its own, and that database's name."""
    with postgres.throwaway_database() as name:
        history = postgres.sqlalchemy_url(name).render_as_string(hide_password=False)
        settings = on_test_broker(make_settings, broker.port, storage={"history": history})
        app = TrainerApp(settings, launcher=FakeLauncher([PhaseEvent(phase=Phase.TRAINING), "hang", "result"]))
        app.start()
        try:
            assert app.link.wait_connected(10)
            yield app, name
        finally:
            app.stop()


def test_a_run_that_ends_while_the_history_is_unreachable_is_published_and_recorded_later(
    pg_history_daemon: tuple[TrainerApp, str], watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PostgreSQL history restarting as a run ended left `state` at `running` until the next run's end,
    and the run's row `running` until the daemon restarted (then "interrupted when the daemon stopped")."""
    app, database = pg_history_daemon
    monkeypatch.setattr(runner_module, "RECORD_RETRY_DELAYS_S", (0.1,))
    run_id = watcher.request(CMD, RESP, {"action": "start"})["data"]["run_id"]
    watcher.wait_for(f"{BASE}/state", lambda v: v["state"] == "running", timeout=10)
    with _history_gone(database):
        assert watcher.request(CMD, RESP, {"action": "cancel"})["status"] == "ok"
        state = watcher.wait_for(f"{BASE}/state", lambda v: v["state"] != "running", timeout=15)
        assert (state["state"], state["run_id"]) == ("cancelled", run_id)
        wait_idle(app)
        assert watcher.request(CMD, RESP, {"action": "status"})["data"]["state"]["state"] == "cancelled"
    assert _row_status(database, run_id) == "running"  # the server is back, nothing has asked yet
    assert watcher.request(CMD, RESP, {"action": "start"})["status"] == "ok"  # the next run records it first
    assert _row_status(database, run_id) == "cancelled"
    app.runner.cancel()


def test_a_history_back_within_seconds_records_the_run_at_its_end(
    pg_history_daemon: tuple[TrainerApp, str], watcher: Watcher, caplog: pytest.LogCaptureFixture
) -> None:
    app, database = pg_history_daemon
    caplog.set_level("WARNING", logger="homeiq_trainer.runner")
    run_id = watcher.request(CMD, RESP, {"action": "start"})["data"]["run_id"]
    watcher.wait_for(f"{BASE}/state", lambda v: v["state"] == "running", timeout=10)
    with _history_gone(database):
        assert watcher.request(CMD, RESP, {"action": "cancel"})["status"] == "ok"
        deadline = time.monotonic() + 10
        while "Could not record the end of run" not in caplog.text:  # the first try met the outage
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # The server is back within the 2 s before the runner tries again.
    last = watcher.wait_for(f"{BASE}/last_run", lambda v: v.get("run_id") == run_id, timeout=20)
    assert last["status"] == "cancelled" and _row_status(database, run_id) == "cancelled"
    wait_idle(app)


def test_a_cancel_while_a_start_counts_stops_that_start(daemon: Any, watcher: Watcher, slow_count: None) -> None:
    """It was answered `not_running`, then the count ended and the run started anyway."""
    app = daemon(["hang"])
    since = len(watcher.messages(RESP))
    start = {"action": "start", "request_id": "s1", "params": {"min_new_samples": 1}}
    watcher.publish(CMD, json.dumps(start))
    watcher.publish(CMD, json.dumps({"action": "cancel", "request_id": "c1"}))
    by_id = {answer["request_id"]: answer for answer in answers(watcher, since, 2)}
    assert by_id["c1"]["status"] == "ok" and by_id["c1"]["data"] == {"run_id": None, "start_cancelled": True}
    assert by_id["s1"]["status"] == "error" and by_id["s1"]["error"]["code"] == "cancelled"
    assert app.runner.active is None


def test_a_request_id_in_use_by_a_counting_start_is_not_run_again(
    daemon: Any, watcher: Watcher, slow_count: None
) -> None:
    """Another command with that id ran, and the start's answer then overwrote its memory."""
    app = daemon(["hang"])
    since = len(watcher.messages(RESP))
    start = json.dumps({"action": "start", "request_id": "r1", "params": {"min_new_samples": 1}})
    watcher.publish(CMD, start)
    watcher.publish(CMD, json.dumps({"action": "runs", "request_id": "r1"}))
    watcher.publish(CMD, start)
    got = answers(watcher, since, 3)
    assert [(a["request_id"], a["status"]) for a in got[:2]] == [("r1", "error"), ("r1", "error")]
    assert [a["error"]["code"] for a in got[:2]] == ["request_id_conflict", "busy"]  # the runs, the repeat
    assert got[2]["action"] == "start" and got[2]["status"] == "ok"  # the one start, answered once
    app.runner.cancel()


def test_a_damaged_newest_example_in_the_last_run_counts_from_its_start(daemon: Any, watcher: Watcher) -> None:
    """Every threshold start answered `internal_error` ("month must be in 1..12")."""
    app = daemon(["result"])
    run_id = watcher.request(CMD, RESP, {"action": "start"})["data"]["run_id"]
    watcher.wait_for(f"{BASE}/last_run", lambda v: v.get("run_id") == run_id, timeout=15)
    wait_idle(app)
    with sqlite3.connect(app.settings.storage.history_db) as conn:
        conn.execute("""UPDATE training_runs SET data_report_json = '{"newest_created_at": "2026-13-01"}'""")
    refused = watcher.request(CMD, RESP, {"action": "start", "params": {"min_new_samples": 100_000}})
    assert refused["error"]["code"] == "not_enough_new_data"


def test_a_setting_the_history_cannot_store_is_answered(
    daemon: Any, watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    from homeiq_trainer.overrides import OverridesStore

    daemon(["result"])

    def locked(*_args: Any) -> None:
        raise OperationalError("INSERT INTO settings", {}, Exception("database is locked"))

    monkeypatch.setattr(OverridesStore, "set", locked)
    since = len(watcher.messages(RESP))
    watcher.publish(f"{BASE}/settings/epochs/set", "5")
    (answer,) = answers(watcher, since, 1)  # before: none at all
    assert answer["action"] == "set" and answer["error"]["code"] == "internal_error"
    assert watcher.wait_for(f"{BASE}/settings")["epochs"] != 5


def test_settings_messages_share_the_commands_rate_and_never_bring_their_bulk(
    daemon: Any, watcher: Watcher, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A looping automation starved commands; a 200 KB value was queued whole (5 MiB ones too)."""
    from homeiq_trainer.settings_entities import SettingsEntities

    seen: list[int] = []
    real = SettingsEntities.on_setting

    def recording(self: SettingsEntities, topic: str, payload: bytes) -> None:
        seen.append(len(payload))
        real(self, topic, payload)

    monkeypatch.setattr(SettingsEntities, "on_setting", recording)
    daemon(["result"], daemon={"commands_per_s": 1, "command_burst": 2})
    since = len(watcher.messages(RESP))
    watcher.publish(f"{BASE}/settings/epochs/set", "9" * 200_000)
    (answer,) = answers(watcher, since, 1)
    assert answer["error"]["code"] == "invalid_setting" and "longer than 1024 bytes" in answer["error"]["message"]
    assert seen == [4097]
    caplog.set_level("WARNING", logger="homeiq_trainer.commands")
    since = len(watcher.messages(RESP))
    for _ in range(10):
        watcher.publish(f"{BASE}/settings/epochs/set", "4")
    got = answers(watcher, since, 10, timeout=15)  # every one answered: applied, or dropped for the rate
    assert len(got) == 10 and all(a["action"] == "set" and a["data"]["setting"] == "epochs" for a in got)
    limited = [a for a in got if a["status"] == "error"]
    assert all(a["error"]["code"] == "rate_limited" for a in limited)
    assert len(limited) == caplog.text.count("dropped one on") >= 6  # before: dropped with no answer
    assert len(seen) - 1 == 10 - len(limited) <= 4  # the burst's one token left, and a few more refilled meanwhile


def test_a_repeat_answered_busy_does_not_free_the_id_of_the_counting_start(
    daemon: Any, watcher: Watcher, slow_count: None
) -> None:
    """The repeat's `busy` freed the id: a `cancel` with it then ran and stopped the start, and the
    start's retry was refused `request_id_conflict` (with that cancel) for 20 hours."""
    app = daemon(["hang"])
    since = len(watcher.messages(RESP))
    start = json.dumps({"action": "start", "request_id": "r2", "params": {"min_new_samples": 1}})
    watcher.publish(CMD, start)
    watcher.publish(CMD, start)
    watcher.publish(CMD, json.dumps({"action": "cancel", "request_id": "r2"}))
    got = answers(watcher, since, 3)
    assert [a["error"]["code"] for a in got[:2]] == ["busy", "request_id_conflict"]
    assert got[2]["action"] == "start" and got[2]["status"] == "ok"
    app.runner.cancel()


def test_a_count_on_a_source_gone_quiet_is_answered_and_frees_the_next_start(
    daemon: Any, watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count waited for good on a server that took its query and never answered, and every later
    start, the nightly automation's too, was refused `busy` ("another start is counting")."""
    proxy = postgres.StallingProxy()
    monkeypatch.setattr(dispatcher_module, "NEW_DATA_CHECK_DEADLINE_S", 0.5)
    monkeypatch.setattr(dispatcher_module, "NEW_DATA_WAIT_MARGIN_S", 0.0)
    app = daemon(["result"], data={"source": proxy.url(), "connect_timeout_s": 1, "busy_timeout_s": 1})
    start = {"action": "start", "params": {"min_new_samples": 1}}
    refused = watcher.request(CMD, RESP, start, timeout=15)
    assert refused["error"]["code"] == "data_unavailable"
    assert refused["error"]["message"] == "counting new examples: no answer within 2.5 s; try again later"
    answered = watcher.request(CMD, RESP, {"action": "start"})  # not `busy`: the count no longer holds starts
    assert answered["status"] == "ok"
    watcher.wait_for(f"{BASE}/last_run", lambda v: v.get("run_id") == answered["data"]["run_id"], timeout=15)
    wait_idle(app)
    proxy.close()


@pytest.fixture
def served_app(daemon: Any, make_settings: SettingsFactory) -> TrainerApp:
    """FIRST served, SECOND completed and kept out, and a daemon whose fake run completes."""
    from homeiq_trainer.history import HistoryStore
    from homeiq_trainer.messages import Decision
    from tests.test_promotion import FIRST, SECOND, _fake_run

    settings = make_settings()
    store = HistoryStore(settings.storage.history_db)
    _fake_run(store, settings, FIRST, Decision.PROMOTED, serve=True)
    _fake_run(store, settings, SECOND, Decision.KEPT_CURRENT)
    store.close()
    app: TrainerApp = daemon([PhaseEvent(phase=Phase.TRAINING), "result"])
    assert app.settings.storage.history_db == settings.storage.history_db
    return app


def test_a_promote_whose_history_read_fails_after_the_switch_is_answered_ok(
    served_app: TrainerApp, watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promote read its run again after the commit: a connection dropping then answered
    `internal_error` for a switch that had happened, and nothing was refreshed."""
    from sqlalchemy.exc import OperationalError

    from tests.test_promotion import FIRST, SECOND

    store = served_app.store
    watcher.wait_for(f"{BASE}/adapter", lambda v: v["installed_version"] == FIRST, timeout=10)
    real_serve, real_by_id, committed = store.serve, store.by_identifier, threading.Event()

    def serve(*args: Any, **kwargs: Any) -> Any:
        committed.set()
        return real_serve(*args, **kwargs)

    def by_identifier(run_identifier: str) -> Any:
        if committed.is_set():
            committed.clear()
            raise OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
        return real_by_id(run_identifier)

    monkeypatch.setattr(store, "serve", serve)
    monkeypatch.setattr(store, "by_identifier", by_identifier)
    answer = watcher.request(CMD, RESP, {"action": "promote", "run_id": SECOND})
    assert answer["status"] == "ok", answer  # before: internal_error, and no `adapter_promoted`
    watcher.wait_for(f"{BASE}/event", lambda v: v["event"] == "adapter_promoted" and v["run_id"] == SECOND, timeout=10)


def test_a_promote_while_a_runs_end_is_published_is_what_the_adapter_topic_says_last(
    served_app: TrainerApp, watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's end read the served adapter, the promote switched and published, then the run's
    end published what it had read: `adapter` said FIRST installed until the next change."""
    from homeiq_trainer import reporter as reporter_module
    from tests.test_promotion import FIRST, SECOND

    watcher.wait_for(f"{BASE}/adapter", lambda v: v["installed_version"] == FIRST, timeout=10)
    real, computed, release = reporter_module.update_payload, threading.Event(), threading.Event()

    def held_on_the_run_thread(*args: Any) -> Any:
        payload = real(*args)
        if threading.current_thread().name.startswith("run-"):
            computed.set()
            release.wait(10)  # read now, published a moment later (a slow history)
        return payload

    monkeypatch.setattr(reporter_module, "update_payload", held_on_the_run_thread)
    assert watcher.request(CMD, RESP, {"action": "start"})["status"] == "ok"
    assert computed.wait(10)
    since = len(watcher.messages(RESP))
    watcher.publish(CMD, json.dumps({"action": "promote", "run_id": SECOND, "request_id": "p1"}))
    time.sleep(0.5)
    release.set()
    assert answers(watcher, since, 1)[0]["status"] == "ok"
    watcher.wait_for(f"{BASE}/state", lambda v: v["state"] == "completed", timeout=10)
    wait_idle(served_app)
    assert served_app.store.served_stack()[0].run_identifier == SECOND
    assert watcher.json(f"{BASE}/adapter")["installed_version"] == SECOND  # before: FIRST


def test_a_start_on_the_completed_state_finds_the_runner_free(
    daemon: Any, watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the final state the problem sensor read the history before the runner let the run go:
    a start sent on `completed` was refused `busy` ("run … is running") whenever that read was slow."""
    from homeiq_trainer import settings_entities

    real = settings_entities.SettingsEntities.publish_problem

    def slow_on_the_run_thread(self: Any) -> None:  # a PostgreSQL history a few tens of ms away
        if threading.current_thread().name.startswith("run-"):
            time.sleep(0.3)
        real(self)

    monkeypatch.setattr(settings_entities.SettingsEntities, "publish_problem", slow_on_the_run_thread)
    app = daemon([PhaseEvent(phase=Phase.TRAINING), "result"])
    for _ in range(2):
        run_id = watcher.request(CMD, RESP, {"action": "start"})["data"]["run_id"]
        watcher.wait_for(
            f"{BASE}/state", lambda v, r=run_id: v["run_id"] == r and v["state"] == "completed", timeout=10
        )
        again = watcher.request(CMD, RESP, {"action": "start"})
        assert again["status"] == "ok", again  # before: busy
        done = again["data"]["run_id"]
        watcher.wait_for(f"{BASE}/state", lambda v, r=done: v["run_id"] == r and v["state"] == "completed", timeout=10)
        wait_idle(app)


def test_a_start_while_the_history_server_is_quiet_is_answered_history_unavailable(
    daemon: Any, watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock's check waited for good on a PostgreSQL history that took it and went quiet, with
    the runner's lock held: the start got no answer, and nor did any command after it."""
    from homeiq_trainer import jobs

    monkeypatch.setattr(jobs, "LOCK_CHECK_WAIT_S", 1.0)
    proxy = postgres.StallingProxy(after_startup=False)
    with postgres.throwaway_database() as name:
        history = proxy.url(name).replace("postgresql://", "postgresql+psycopg://")
        app = daemon(["result"], storage={"history": history})
        proxy.frozen.set()
        refused = watcher.request(CMD, RESP, {"action": "start"}, timeout=15)
        assert refused["error"]["code"] == "history_unavailable", refused  # before: no answer
        assert "does not answer" in refused["error"]["message"]
        assert watcher.request(CMD, RESP, {"action": "cancel"})["error"]["code"] == "not_running"
        app.stop()
    proxy.close()
