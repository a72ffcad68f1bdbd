"""Settings from Home Assistant, pure: the overrides store, pinned values, schema checks, entities."""

from __future__ import annotations

import json
import logging
import math
import re
from enum import StrEnum
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from homeiq_trainer.control import (
    CONTROLS,
    Control,
    SettingPinned,
    SettingsPanel,
    active_controls,
    number_limits,
    parse_value,
    select_options,
)
from homeiq_trainer.discovery import Component, DeviceDiscovery, build_discovery
from homeiq_trainer.history import HistoryStore
from homeiq_trainer.overrides import (
    OverridesStore,
    SettingRefused,
    apply_overrides,
    field_info,
    pinned_settings,
    with_value,
)
from homeiq_trainer.problem import problem_payload
from homeiq_trainer.settings import ConfigError, load_settings


@pytest.fixture
def history(tmp_path: Path) -> HistoryStore:
    store = HistoryStore(tmp_path / "history.db")
    yield store
    store.close()


def test_store_keeps_values_across_instances(history: HistoryStore, tmp_path: Path) -> None:
    store = OverridesStore(history.engine)
    store.set("training.epochs", 5)
    store.set("training.learning_rate", 0.0003)
    store.set("training.epochs", 6)
    store.set("log_level", "DEBUG")
    store.remove("log_level")
    store.remove("never.set")
    history.close()
    reopened = HistoryStore(tmp_path / "history.db")
    assert OverridesStore(reopened.engine).load() == {"training.epochs": 6, "training.learning_rate": 0.0003}
    assert reopened.recent(5) == []  # beside training_runs, not in it
    reopened.close()


def test_pinned_by_environment_and_command_line() -> None:
    env = {
        "HOMEIQ_TRAINING__EPOCHS": "4",
        "homeiq_data__max_samples": "10",  # pydantic-settings reads names in any case
        "HOMEIQ_TRAINING": '{"learning_rate": 0.001, "batch_size": 2}',
        "HOMEIQ_LOG_LEVEL": "debug",
        "HOMEIQ_CONFIG": "/etc/homeiq.toml",  # not a setting
        "HOMEIQ_DAEMON": "not json",
        "PATH": "/bin",
    }
    pinned = pinned_settings(env, {"storage": {"output_dir": "/x"}})
    assert pinned == {
        "training.epochs": "the environment variable HOMEIQ_TRAINING__EPOCHS",
        "data.max_samples": "the environment variable homeiq_data__max_samples",
        "training.learning_rate": "the environment variable HOMEIQ_TRAINING",
        "training.batch_size": "the environment variable HOMEIQ_TRAINING",
        "log_level": "the environment variable HOMEIQ_LOG_LEVEL",
        "storage.output_dir": "the command line",
    }


def test_pinned_list_matches_what_pydantic_settings_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"HOMEIQ_TRAINING": '{"epochs": 7}', "homeiq_data__max_samples": "11", "HOMEIQ_LOG_LEVEL": "error"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert (settings.training.epochs, settings.data.max_samples, settings.log_level) == (7, 11, "ERROR")
    assert set(pinned_settings(env)) == {"training.epochs", "data.max_samples", "log_level"}


@pytest.mark.parametrize(
    ("path", "value", "toml"),
    [
        ("training.epochs", 0, "[training]\nepochs = 0\n"),
        ("training.epochs", "many", '[training]\nepochs = "many"\n'),
        ("training.learning_rate", 2.0, "[training]\nlearning_rate = 2.0\n"),
        ("training.learning_rate", math.nan, "[training]\nlearning_rate = nan\n"),
        ("data.max_samples", 5_000_000, "[data]\nmax_samples = 5000000\n"),
        ("log_level", "LOUD", 'log_level = "LOUD"\n'),
    ],
)
def test_bad_value_gets_the_toml_message(path: str, value: object, toml: str, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as from_toml:
        load_settings(config)
    with pytest.raises(SettingRefused) as from_ha:
        with_value(load_settings(), path, value)
    # The same schema says the same thing; the TOML's line adds the environment variable's name.
    toml_line = re.sub(r" \(HOMEIQ_\w+\)", "", str(from_toml.value))
    assert str(from_ha.value) == toml_line.replace("invalid configuration", "invalid setting")
    assert str(from_ha.value).startswith(f"invalid setting: {path}: Input should be")


def test_with_value_validates_and_copies() -> None:
    settings = load_settings(None, {"mqtt": {"password": "s3cret"}})
    before = settings.training.learning_rate
    changed = with_value(settings, "training.learning_rate", "3e-4")
    assert before != 0.0003  # so the copy's value can only come from the text
    assert changed.training.learning_rate == 0.0003 and settings.training.learning_rate == before
    changed = with_value(settings, "log_level", "debug")
    assert changed.log_level == "DEBUG"
    assert changed.mqtt.password is not None and changed.mqtt.password.get_secret_value() == "s3cret"


def test_apply_skips_pinned_unknown_and_invalid_values() -> None:
    settings = load_settings()
    stored = {"training.epochs": 9, "training.batch_size": 4, "promotion.colour": "red", "data.max_samples": 0}
    effective, ignored = apply_overrides(settings, stored, {"training.epochs": "the command line"})
    assert effective.training.epochs == 3 and effective.training.batch_size == 4 and effective.data.max_samples == 2000
    assert ignored["training.epochs"] == "pinned by the command line"
    assert ignored["promotion.colour"] == "no such setting in this version"
    assert "greater than or equal to 1" in ignored["data.max_samples"]


def test_parse_value() -> None:
    assert parse_value(b"3e-4") == 0.0003 and parse_value(b" 5 ") == 5 and parse_value(b"5.0") == 5.0
    assert math.isnan(parse_value(b"NaN")) and parse_value(b"Infinity") == math.inf
    assert parse_value(b"true") == "true" and parse_value(b"google/flan-t5-small") == "google/flan-t5-small"
    with pytest.raises(SettingRefused, match="UTF-8"):
        parse_value(b"\xff")
    with pytest.raises(SettingRefused, match="longer than 1024 bytes"):
        parse_value(b"1" * 5000)


def test_table_lists_controls_whose_settings_may_come_later() -> None:
    names = [control.name for control in CONTROLS]
    assert len(names) == len(set(names))
    active = {control.name for control in active_controls()}
    assert {"epochs", "max_samples", "learning_rate", "batch_size", "min_new_samples", "base_model", "log_level"} <= (
        active
    )
    for control in CONTROLS:
        assert (control.name in active) == (field_info(control.path) is not None)


def test_select_choices_from_a_literal_or_an_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    class Policy(StrEnum):
        IF_BETTER = "if_better"
        MANUAL = "manual"

    field = FieldInfo(annotation=Policy, default=Policy.IF_BETTER)
    monkeypatch.setattr("homeiq_trainer.control.field_info", lambda path: field)
    control = Control("policy", "promotion.policy", "select", "Policy", "mdi:x")
    assert select_options(control, load_settings()) == ["if_better", "manual"]
    field = FieldInfo(annotation=int, default=1)
    with pytest.raises(TypeError, match="neither a Literal nor an Enum"):
        select_options(control, load_settings())


def test_entity_ranges_and_choices_come_from_the_schema() -> None:
    by_name = {control.name: control for control in active_controls()}
    settings = load_settings(None, {"training": {"allowed_base_models": ["google/flan-t5-base"]}})
    # The schema's bounds, narrowed by the limits an MQTT `start` gets.
    assert number_limits(by_name["epochs"], settings) == {"step": 1, "min": 1, "max": 10}
    assert number_limits(by_name["learning_rate"], settings) == {"step": 0.001, "min": 1e-06, "max": 0.01}
    assert number_limits(by_name["batch_tokens"], settings) == {"step": 1, "min": 64, "max": 1_048_576}
    unlimited = load_settings(None, {"limits": {"max_epochs": 100, "max_learning_rate": 1.0}})
    assert number_limits(by_name["epochs"], unlimited) == {"step": 1, "min": 1, "max": 100}
    assert number_limits(by_name["learning_rate"], unlimited) == {"step": 0.001, "min": 1e-06, "max": 1.0}
    assert select_options(by_name["base_model"], settings) == ["google/flan-t5-small", "google/flan-t5-base"]
    assert select_options(by_name["log_level"], settings) == ["DEBUG", "INFO", "WARNING", "ERROR"]


def test_panel_changes_refuses_and_logs_a_pinned_refusal_once(
    history: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = OverridesStore(history.engine)
    configured = load_settings(None, {"training": {"allowed_base_models": ["google/flan-t5-base"]}})
    panel = SettingsPanel(configured, store, {"training.batch_size": "the environment variable X"})
    assert panel.change("learning_rate", b"1e-3")[1] == 0.001
    assert panel.change("base_model", b"google/flan-t5-base")[1] == "google/flan-t5-base"
    with pytest.raises(SettingRefused, match="must be one of google/flan-t5-small, google/flan-t5-base"):
        panel.change("base_model", b"evil/model")
    with pytest.raises(SettingRefused, match="unknown setting"):
        panel.change("colour", b"red")
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        with pytest.raises(SettingPinned, match="pinned by the environment variable X"):
            panel.change("batch_size", b"2")
    assert caplog.text.count("pinned by the environment variable X") == 1
    state = panel.state()
    assert state["learning_rate"] == 0.001 and state["base_model"] == "google/flan-t5-base"
    assert state["pinned"]["batch_size"] == "the environment variable X" and state["pinned"]["epochs"] is None
    assert store.load() == {"training.learning_rate": 0.001, "training.base_model": "google/flan-t5-base"}
    # The allow-list is the configured one: choosing another model does not drop the configured one.
    assert panel.change("base_model", b"google/flan-t5-small")[1] == "google/flan-t5-small"


def test_settings_from_home_assistant_get_the_limits_a_start_gets(
    history: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = OverridesStore(history.engine)
    store.set("training.batch_size", 512)  # stored before the limit applied here
    caplog.set_level(logging.WARNING)
    panel = SettingsPanel(load_settings(), store, {})
    assert panel.effective.training.batch_size == 64
    assert "training.batch_size: batch_size 512 is beyond limits.max_batch_size (64)" in caplog.text
    for name, payload, limit in (
        ("epochs", b"100", "limits.max_epochs (10)"),
        ("learning_rate", b"1.0", "limits.max_learning_rate (0.01)"),
        ("max_samples", b"1000000", "limits.max_samples (5000)"),
    ):
        with pytest.raises(SettingRefused, match=re.escape(limit)):
            panel.change(name, payload)
    assert panel.effective.training.epochs == 3 and "training.epochs" not in store.load()
    assert panel.change("epochs", b"10")[1] == 10
    assert panel.change("batch_tokens", b"1048576")[1] == 1_048_576  # no limit on it

    # A stored value that is no number is ignored like any invalid one, and the daemon starts.
    store.set("training.epochs", "five")
    assert SettingsPanel(load_settings(), store, {}).effective.training.epochs == 3
    # The owner's configured value may lie beyond a limit: Home Assistant may show and set it, no more.
    owner = load_settings(None, {"training": {"batch_size": 128}})
    by_name = {control.name: control for control in active_controls()}
    assert number_limits(by_name["batch_size"], owner)["max"] == 128
    panel = SettingsPanel(owner, store, {})
    assert panel.change("batch_size", b"128")[1] == 128
    with pytest.raises(SettingRefused, match=re.escape("limits.max_batch_size (64)")):
        panel.change("batch_size", b"100")


def test_stored_choice_taken_off_the_allow_list_is_ignored(
    history: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = OverridesStore(history.engine)
    store.set("training.base_model", "google/flan-t5-base")
    store.set("training.epochs", 4)
    caplog.set_level(logging.WARNING)
    panel = SettingsPanel(load_settings(), store, {})
    assert panel.effective.training.base_model == "google/flan-t5-small" and panel.effective.training.epochs == 4
    assert "'google/flan-t5-base' is no longer one of the choices" in caplog.text


@pytest.mark.parametrize("default_entity_ids", [True, False])
def test_discovery_validates_with_and_without_entity_ids(default_entity_ids: bool) -> None:
    settings = load_settings(None, {"mqtt": {"default_entity_ids": default_entity_ids}})
    payload = build_discovery(settings).payload()
    DeviceDiscovery.model_validate(payload)
    components = payload["components"]
    for component in components.values():
        if component["platform"] == "device_automation":
            continue  # device triggers are not entities: they have no entity id
        assert ("default_entity_id" in component) is default_entity_ids
        assert ("object_id" in component) is default_entity_ids
    config = {key for key, c in components.items() if c.get("entity_category") == "config"}
    assert config == {control.name for control in active_controls()}
    assert components["epochs"]["command_topic"] == "homeiq/trainer/settings/epochs/set"
    assert components["epochs"]["state_topic"] == "homeiq/trainer/settings"
    assert components["learning_rate"]["mode"] == "box"
    assert components["log_level"]["options"] == ["DEBUG", "INFO", "WARNING", "ERROR"]
    assert components["reannounce"]["entity_category"] == "diagnostic"
    assert components["problem"]["device_class"] == "problem"
    assert components["problem"]["entity_category"] == "diagnostic"
    assert len(json.dumps(payload)) < 16_000


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (
            {"platform": "number", "unique_id": "a", "name": "x", "state_topic": "s", "min": 1, "max": 2},
            "command_topic",
        ),
        (
            {
                "platform": "number",
                "unique_id": "a",
                "name": "x",
                "state_topic": "s",
                "command_topic": "c",
                "min": 2,
                "max": 2,
            },
            "min below max",
        ),
        (
            {
                "platform": "number",
                "unique_id": "a",
                "name": "x",
                "state_topic": "s",
                "command_topic": "c",
                "step": 1e-4,
            },
            "step",
        ),
        (
            {"platform": "select", "unique_id": "a", "name": "x", "state_topic": "s", "command_topic": "c"},
            "needs options",
        ),
        (
            {
                "platform": "select",
                "unique_id": "a",
                "name": "x",
                "state_topic": "s",
                "command_topic": "c",
                "options": ["a"],
                "min": 1,
            },
            r"select does not take \['min'\]",
        ),
        ({"platform": "button", "unique_id": "a", "name": "x", "command_topic": "c", "object_id": "x"}, "go together"),
    ],
)
def test_new_platforms_are_checked_like_the_old(bad: dict, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        Component.model_validate(bad)


def test_problem_payload() -> None:
    assert problem_payload("completed", None) == {
        "problem": False,
        "last_run_failed": False,
        "source_error": None,
        "reasons": [],
    }
    failing = problem_payload("failed", "source database not found: /x")
    assert failing["problem"] and failing["last_run_failed"] and len(failing["reasons"]) == 2
    assert problem_payload(None, "gone")["problem"]


def test_an_unexpected_error_while_checking_the_source_is_reported_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only `DataError` used to count: anything else left the problem sensor saying the source was fine."""
    from homeiq_trainer import problem

    settings = load_settings(None, {"data": {"source": "postgresql://homeiq:s3cret@db.local/homeiq"}})

    def broken(*_args: object, **_kwargs: object) -> int:
        raise RuntimeError("driver said: postgresql://homeiq:s3cret@db.local/homeiq is odd")

    monkeypatch.setattr(problem, "count_new_examples", broken)
    seen: list[str | None] = []
    watch = problem.SourceWatch(settings, seen.append)
    error = watch.check()
    assert error is not None and "RuntimeError" in error and "s3cret" not in error
    assert seen == [error] and problem_payload(None, error)["problem"]


def test_a_problem_sensor_the_history_could_not_publish_is_published_at_the_next_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reported only changes: a publish that failed (the history on the same server, down
    too) left the sensor off for the whole outage."""
    from sqlalchemy.exc import OperationalError

    from homeiq_trainer import problem
    from homeiq_trainer.history import HistoryStore
    from homeiq_trainer.settings_entities import SettingsEntities
    from homeiq_trainer.topics import Topics

    settings = load_settings(None, {"storage": {"history_db": str(tmp_path / "h.db"), "output_dir": str(tmp_path)}})
    monkeypatch.setattr(problem, "probe_source", lambda _settings: "cannot read ask_ai_queries: server down")
    published: list[tuple[str, str]] = []

    class Publisher:
        def retain(self, topic: str, payload: str) -> None:
            published.append((topic, payload))

    store = HistoryStore(settings.storage.history_db)
    entities = SettingsEntities(settings, Topics.from_settings(settings), store, Publisher())  # type: ignore[arg-type]
    real = store.latest_finished
    down = {"now": True}

    def latest_finished() -> object:
        if down["now"]:
            raise OperationalError("SELECT", {}, Exception("server closed the connection"))
        return real()

    monkeypatch.setattr(store, "latest_finished", latest_finished)
    entities.source_watch.check()
    assert published == [] and entities.source_watch.stale
    down["now"] = False
    entities.source_watch.check()  # the same answer as before: published only because the last one failed
    assert len(published) == 1 and json.loads(published[0][1])["problem"] is True
    entities.source_watch.check()
    assert len(published) == 1
    store.close()


def test_the_problem_sensor_published_last_is_the_one_read_last(tmp_path: Path) -> None:
    """A run's end and the source check publish it from two threads: a read of the last run that
    was slow (the history busy) was published after the newer one, and the sensor stayed on."""
    import threading
    import time

    from homeiq_trainer.history import TrainingRun
    from homeiq_trainer.settings_entities import SettingsEntities
    from homeiq_trainer.topics import Topics

    settings = load_settings(None, {"storage": {"history_db": str(tmp_path / "h.db"), "output_dir": str(tmp_path)}})
    published: list[bool] = []

    class Publisher:
        def retain(self, topic: str, payload: str) -> None:
            published.append(json.loads(payload)["last_run_failed"])

    store = HistoryStore(settings.storage.history_db)
    entities = SettingsEntities(settings, Topics.from_settings(settings), store, Publisher())  # type: ignore[arg-type]
    last = {"status": "failed"}
    reading = threading.Event()

    def latest_finished() -> TrainingRun:
        run = TrainingRun(run_identifier="run_1", status=last["status"])
        if threading.current_thread().name == "slow":
            reading.set()
            time.sleep(0.5)  # read before the run below ended, published after it
        return run

    store.latest_finished = latest_finished  # type: ignore[method-assign]
    slow = threading.Thread(target=entities.publish_problem, name="slow")
    slow.start()
    assert reading.wait(5)
    last["status"] = "completed"  # a new run completed: its end publishes the sensor
    entities.publish_problem()
    slow.join(5)
    assert published[-1] is False  # before: [False, True], the failed run's sensor last
    store.close()
