"""The Home Assistant add-on: its files follow the add-on reference, its options reach the settings,
the Supervisor's broker is found, and its image's install steps produce an importable package."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from homeiq_trainer import addon
from homeiq_trainer.addon import (
    OPTION_MAP,
    OPTIONS_PATH_ENV,
    SUPERVISOR_URL_ENV,
    AddonError,
    addon_settings_source,
    load_addon_options,
    supervisor_mqtt_service,
)
from homeiq_trainer.settings import ConfigError, Settings, load_settings

from .supervisor import FakeSupervisor

ROOT = Path(__file__).resolve().parents[1]
ADDON = ROOT / "addon"
TOKEN = "supervisor-token-0123456789abcdef"
BROKER_PASSWORD = "broker-pass-fedcba9876543210"

# Supervisor's schema element syntax (supervisor's addon options validation, RE_SCHEMA_ELEMENT).
RE_SCHEMA_ELEMENT = re.compile(
    r"^(?:"
    r"|bool|email|url|port"
    r"|device(?:\(subsystem=[a-z]+\))?"
    r"|str(?:\(\d*,\d*\))?"
    r"|password(?:\(\d*,\d*\))?"
    r"|int(?:\(-?\d*,-?\d*\))?"
    r"|float(?:\((?:-?\d*\.?\d+)?,(?:-?\d*\.?\d+)?\))?"
    r"|match\(.*\)"
    r"|list\(.+\)"
    r")\??$"
)
RE_SLUG = re.compile(r"^[-_.A-Za-z0-9]+$")
MAP_TYPES = {
    "homeassistant_config",
    "addon_config",
    "ssl",
    "addons",
    "backup",
    "share",
    "media",
    "all_addon_configs",
    "data",
}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return _yaml(ADDON / "config.yaml")


@pytest.fixture(autouse=True)
def _no_outside_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets may reach the settings."""
    for name in list(os.environ):
        if name.startswith("HOMEIQ_") or name == "SUPERVISOR_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", "/outside/hf")


def _write_options(tmp_path: Path, options: dict[str, Any]) -> Path:
    path = tmp_path / "options.json"
    path.write_text(json.dumps(options), encoding="utf-8")
    return path


# --- the add-on's files ------------------------------------------------------------------------------


def test_config_has_the_required_keys_and_current_values(config: dict[str, Any]) -> None:
    for key in ("name", "version", "slug", "description", "arch"):
        assert config.get(key), key
    assert config["name"] == "HomeIQ Trainer"
    assert config["slug"] == "homeiq_trainer" and RE_SLUG.match(config["slug"])
    assert config["arch"] == ["amd64", "aarch64"]
    assert config["startup"] == "application"
    assert config["boot"] == "auto"
    assert config["init"] is False
    assert config["services"] == ["mqtt:need"]
    assert 30 <= config["timeout"] <= 300
    assert config["url"].startswith("https://")
    assert "hf_cache" in config["backup_exclude"]


def test_config_version_is_the_package_version(config: dict[str, Any]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert isinstance(config["version"], str)
    assert config["version"] == pyproject["project"]["version"]


def test_map_uses_supervisor_folder_types(config: dict[str, Any]) -> None:
    entries = {entry["type"]: entry for entry in config["map"]}
    assert set(entries) <= MAP_TYPES
    # adapters are written to the share; certificates are only read
    assert entries["share"]["read_only"] is False
    assert entries["ssl"]["read_only"] is True


def test_every_option_has_a_schema_entry_and_every_schema_entry_is_known(config: dict[str, Any]) -> None:
    options, schema = config["options"], config["schema"]
    assert set(options) <= set(schema)
    assert set(schema) == set(OPTION_MAP)
    required = {name for name, kind in schema.items() if isinstance(kind, str) and not kind.endswith("?")}
    # a required option without a default would stop the add-on from starting until it is filled in
    assert required <= set(options)


def test_schema_types_are_supervisor_types(config: dict[str, Any]) -> None:
    for name, kind in config["schema"].items():
        elements = kind if isinstance(kind, list) else [kind]
        for element in elements:
            assert isinstance(element, str) and RE_SCHEMA_ELEMENT.match(element), f"{name}: {element!r}"
        assert not (isinstance(kind, str) and kind.endswith("?") and name in config["options"]), name


def test_option_defaults_are_the_daemon_defaults(config: dict[str, Any]) -> None:
    defaults = Settings.model_construct()  # no sources: the declared defaults
    options = config["options"]
    for name, value in options.items():
        if name in ("source_db", "output_dir"):
            continue  # add-on paths, not a source checkout's
        current: Any = defaults
        for part in OPTION_MAP[name]:
            current = getattr(current, part)
        if name == "log_level":
            assert value.upper() == current
        elif name == "allowed_base_models":
            assert tuple(value) == current
        else:
            assert value == current, name


def test_translations_name_and_describe_every_option(config: dict[str, Any]) -> None:
    translations = _yaml(ADDON / "translations" / "en.yaml")["configuration"]
    assert set(translations) == set(config["schema"])
    for name, text in translations.items():
        assert text.get("name", "").strip(), name
        assert text.get("description", "").strip(), name


def test_docs_explain_every_option(config: dict[str, Any]) -> None:
    docs = (ADDON / "DOCS.md").read_text(encoding="utf-8")
    for name in config["schema"]:
        assert f"`{name}`" in docs, name


def test_build_uses_the_debian_base_images(config: dict[str, Any]) -> None:
    # The base comes from BUILD_ARCH, which every Supervisor passes; build.yaml is deprecated, and
    # without one an older Supervisor passes a BUILD_FROM naming the Alpine base (no PyTorch wheels).
    assert not (ADDON / "build.yaml").exists()
    instructions = _dockerfile_instructions()
    assert not [rest for _, rest in instructions if "BUILD_FROM" in rest]
    images = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(images) == 1
    for arch in config["arch"]:
        assert images[0].replace("${BUILD_ARCH}", arch) == f"ghcr.io/home-assistant/{arch}-base-debian:bookworm"


def test_repository_file_names_the_repository() -> None:
    repository = _yaml(ROOT / "repository.yaml")
    assert repository["name"] and repository["url"].startswith("https://") and repository["maintainer"]


@pytest.mark.parametrize(("name", "size"), [("icon.png", (128, 128)), ("logo.png", None)])
def test_images_are_png(name: str, size: tuple[int, int] | None) -> None:
    data = (ADDON / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if size is not None:
        assert (width, height) == size
    assert len(data) < 100_000


def test_run_script_passes_bash_syntax_check() -> None:
    script = ADDON / "run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)
    text = script.read_text(encoding="utf-8")
    assert "set -euo pipefail" in text
    assert re.search(r"^exec homeiq-trainer serve$", text, re.MULTILINE)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shell_scripts_pass_shellcheck() -> None:
    # The add-on's entry point, and the scripts that install and run everything here and in CI.
    scripts = [ADDON / "run.sh", *sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"]
    subprocess.run(["shellcheck", *map(str, scripts)], check=True, cwd=ROOT)


# --- options -> settings -----------------------------------------------------------------------------

SOURCE_PASSWORD = "homeiq-db-s3cret"

EVERY_OPTION: dict[str, Any] = {
    "source": "postgresql+asyncpg://homeiq_trainer@192.168.1.10:5432/homeiq",
    "source_password": SOURCE_PASSWORD,
    "homeiq_runs": True,
    "source_db": "/share/homeiq/db/ai_automation.db",
    "output_dir": "/share/homeiq/adapters",
    "history_db": "/share/homeiq/trainer_history.db",
    "base_model": "google/flan-t5-base",
    "allowed_base_models": ["google/flan-t5-small", "/share/models/t5-tiny"],
    "epochs": 7,
    "max_samples": 1234,
    "learning_rate": 0.0005,
    "batch_size": 4,
    "lora_rank": 32,
    "keep_runs": 9,
    "mqtt_host": "broker.lan",
    "mqtt_port": 8883,
    "mqtt_username": "trainer",
    "mqtt_password": BROKER_PASSWORD,
    "mqtt_tls": True,
    "mqtt_ca_certs": "/ssl/ca.pem",
    "base_topic": "home/trainer",
    "discovery_prefix": "ha-discovery",
    "promotion_policy": "manual",
    "log_level": "debug",
}


def _field(settings: Settings, option: str) -> Any:
    value: Any = settings
    for part in OPTION_MAP[option]:
        value = getattr(value, part)
    return value


def test_every_option_reaches_its_setting(tmp_path: Path, config: dict[str, Any]) -> None:
    assert set(EVERY_OPTION) == set(config["schema"]), "add the new option to EVERY_OPTION"
    options = load_addon_options(_write_options(tmp_path, EVERY_OPTION))
    settings = load_settings(addon_options=options)

    assert settings.data.source_db == Path("/share/homeiq/db/ai_automation.db")
    source = settings.data.source_url()
    assert (
        source.render_as_string(hide_password=True)
        == "postgresql+psycopg://homeiq_trainer:***@192.168.1.10:5432/homeiq"
    )
    assert source.password == SOURCE_PASSWORD and SOURCE_PASSWORD not in repr(settings)
    assert settings.storage.homeiq_runs is True and settings.homeiq_runs_url() == source
    assert settings.storage.output_dir == Path("/share/homeiq/adapters")
    assert settings.storage.history_db == Path("/share/homeiq/trainer_history.db")
    assert settings.training.base_model == "google/flan-t5-base"
    assert settings.training.allowed_base_models == ("google/flan-t5-small", "/share/models/t5-tiny")
    assert settings.training.epochs == 7
    assert settings.data.max_samples == 1234
    assert settings.training.learning_rate == 0.0005
    assert settings.training.batch_size == 4
    assert settings.lora.r == 32
    assert settings.storage.keep_runs == 9
    assert settings.mqtt.host == "broker.lan"
    assert settings.mqtt.port == 8883
    assert settings.mqtt.username == "trainer"
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == BROKER_PASSWORD
    assert settings.mqtt.tls is True
    assert settings.mqtt.ca_certs == Path("/ssl/ca.pem")
    assert settings.mqtt.base_topic == "home/trainer"
    assert settings.mqtt.discovery_prefix == "ha-discovery"
    assert settings.promotion.policy == "manual"
    assert settings.log_level == "DEBUG"
    defaults = Settings.model_construct()
    for option in EVERY_OPTION:
        assert _field(settings, option) != _field(defaults, option), f"{option} changed nothing"


def test_the_default_options_give_the_documented_add_on_layout(tmp_path: Path, config: dict[str, Any]) -> None:
    # what the Supervisor writes on the first start: the defaults from config.yaml
    options = load_addon_options(_write_options(tmp_path, config["options"]))
    settings = load_settings(addon_options=options)
    assert settings.data.source_db == Path("/share/homeiq/ai_automation.db")
    assert settings.storage.output_dir == Path("/share/homeiq/ask_ai_soft_prompt")
    assert settings.storage.history_db == tmp_path / "homeiq_trainer.db"
    assert settings.mqtt.host == "localhost"  # the Supervisor's broker is added by addon_settings_source
    assert settings.log_level == "INFO"


def test_empty_optional_values_are_left_out(tmp_path: Path) -> None:
    path = _write_options(
        tmp_path,
        {"mqtt_host": "", "mqtt_port": None, "mqtt_password": "", "allowed_base_models": [], "epochs": 4},
    )
    options = load_addon_options(path)
    assert options == {"training": {"epochs": 4}, "storage": {"history_db": str(tmp_path / "homeiq_trainer.db")}}


def test_environment_outranks_add_on_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = load_addon_options(_write_options(tmp_path, {"epochs": 7, "max_samples": 50}))
    monkeypatch.setenv("HOMEIQ_TRAINING__EPOCHS", "2")
    settings = load_settings(addon_options=options)
    assert settings.training.epochs == 2
    assert settings.data.max_samples == 50


def test_no_options_file_means_not_an_add_on(tmp_path: Path) -> None:
    assert load_addon_options(tmp_path / "options.json") is None


def test_options_path_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPTIONS_PATH_ENV, str(_write_options(tmp_path, {"epochs": 5})))
    options = load_addon_options()
    assert options is not None and options["training"] == {"epochs": 5}


def test_unknown_option_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(AddonError, match="'lora_alpha'"):
        load_addon_options(_write_options(tmp_path, {"epochs": 3, "lora_alpha": 32}))


def test_options_that_are_not_utf8_are_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "options.json"
    path.write_bytes(b'{"base_model": "\xff"}')
    with pytest.raises(AddonError, match="are not UTF-8 text"):
        load_addon_options(path)


def test_blank_rows_of_a_list_are_no_entries(tmp_path: Path) -> None:
    blank = load_addon_options(_write_options(tmp_path, {"allowed_base_models": ["", "  "]}))
    assert blank is not None and "training" not in blank
    kept = load_addon_options(_write_options(tmp_path, {"allowed_base_models": ["", "google/flan-t5-base"]}))
    assert kept is not None and kept["training"] == {"allowed_base_models": ["google/flan-t5-base"]}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"epochs"'])
def test_unreadable_options_file_is_a_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "options.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AddonError, match="add-on options"):
        load_addon_options(path)


def test_relative_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AddonError, match="'source_db' must be an absolute path"):
        load_addon_options(_write_options(tmp_path, {"source_db": "homeiq/ai_automation.db"}))


def test_source_must_be_a_url_or_an_absolute_path(tmp_path: Path) -> None:
    with pytest.raises(AddonError, match="'source' must be a URL"):
        load_addon_options(_write_options(tmp_path, {"source": "homeiq/ai_automation.db"}))
    options = load_addon_options(_write_options(tmp_path, {"source": "/share/homeiq/ai_automation.db"}))
    assert options is not None and options["data"] == {"source": "/share/homeiq/ai_automation.db"}


def test_out_of_range_option_names_the_setting_without_the_password(tmp_path: Path) -> None:
    options = load_addon_options(_write_options(tmp_path, {"lora_rank": 1000, "mqtt_password": BROKER_PASSWORD}))
    with pytest.raises(ConfigError, match=r"lora\.r \(add-on option lora_rank\): ") as caught:
        load_settings(addon_options=options)
    assert BROKER_PASSWORD not in str(caught.value)
    assert "HOMEIQ_" not in str(caught.value)  # no environment variable the add-on's user could not set


def test_an_error_across_options_names_them_as_the_form_does(tmp_path: Path) -> None:
    options = load_addon_options(_write_options(tmp_path, {"mqtt_ca_certs": "/ssl/ca.pem"}))
    with pytest.raises(ConfigError, match=r"set mqtt\.tls \(add-on option mqtt_tls\) = true"):
        load_settings(addon_options=options)


# --- the Supervisor's MQTT service -------------------------------------------------------------------


def _mqtt_service(handler: BaseHTTPRequestHandler) -> tuple[int, bytes]:
    if handler.path != "/services/mqtt":
        return 404, b'{"result": "error", "message": "not found"}'
    if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
        return 401, b'{"result": "error", "message": "Unauthorized"}'
    data = {
        "addon": "core_mosquitto",
        "host": "core-mosquitto",
        "port": 1883,
        "ssl": False,
        "protocol": "3.1.1",
        "username": "addons",
        "password": BROKER_PASSWORD,
    }
    return 200, json.dumps({"result": "ok", "data": data}).encode()


@pytest.fixture
def supervisor() -> Iterator[FakeSupervisor]:
    with FakeSupervisor(_mqtt_service) as fake:
        yield fake


def test_broker_from_the_supervisor(supervisor: FakeSupervisor) -> None:
    broker = supervisor_mqtt_service(TOKEN, supervisor.url)
    assert broker == {
        "host": "core-mosquitto",
        "port": 1883,
        "username": "addons",
        "password": BROKER_PASSWORD,
        "tls": False,
    }
    assert supervisor.requests == [("/services/mqtt", f"Bearer {TOKEN}")]


def test_wrong_token_is_a_clear_error_without_the_token(supervisor: FakeSupervisor) -> None:
    with pytest.raises(AddonError, match="HTTP 401: Unauthorized") as caught:
        supervisor_mqtt_service("wrong-token-0123456789", supervisor.url)
    assert "wrong-token-0123456789" not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, b"Internal Server Error", "HTTP 500"),
        (400, b'{"result": "error", "message": "No service available"}', "HTTP 400: No service available"),
        (200, b"<html>not json</html>", "not .* JSON"),
        (200, b'{"result": "error", "message": "MQTT not provided"}', "no MQTT service .*: MQTT not provided"),
        (200, b'{"result": "ok", "data": {"port": 1883}}', "no broker host"),
        (200, b'{"result": "ok", "data": {"host": "core-mosquitto", "port": "x"}}', "no valid broker port"),
        (200, ("{" + f'"message": "{TOKEN}", "result": "error"' + "}").encode(), r"\*\*\*"),
    ],
)
def test_failing_supervisor_is_a_clear_error(
    status: int, body: bytes, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeSupervisor(lambda _handler: (status, body)) as fake, pytest.raises(AddonError) as caught:
        supervisor_mqtt_service(TOKEN, fake.url)
    message = str(caught.value)
    assert re.search(expected, message), message
    assert "\n" not in message
    assert TOKEN not in message and TOKEN not in caplog.text
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__  # no chained traceback


def test_unreachable_supervisor_is_a_clear_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AddonError, match="cannot reach the Supervisor") as caught:
        supervisor_mqtt_service(TOKEN, f"http://127.0.0.1:{port}", timeout_s=2)
    assert TOKEN not in str(caught.value)


def test_silent_supervisor_times_out() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # accepts, never answers
        with pytest.raises(AddonError, match="cannot reach the Supervisor"):
            supervisor_mqtt_service(TOKEN, f"http://127.0.0.1:{sock.getsockname()[1]}", timeout_s=0.3)


def test_only_http_supervisor_urls() -> None:
    with pytest.raises(AddonError, match="http://"):
        supervisor_mqtt_service(TOKEN, "file:///etc/passwd")


# --- addon_settings_source ---------------------------------------------------------------------------


def _env(tmp_path: Path, supervisor: FakeSupervisor | None = None, **extra: str) -> dict[str, str]:
    env = {OPTIONS_PATH_ENV: str(tmp_path / "options.json"), "HF_HOME": "/outside/hf", **extra}
    if supervisor is not None:
        env.update({"SUPERVISOR_TOKEN": TOKEN, SUPERVISOR_URL_ENV: supervisor.url})
    return env


def test_supervisor_broker_fills_in_what_the_options_leave_empty(
    tmp_path: Path, supervisor: FakeSupervisor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _write_options(tmp_path, {"mqtt_username": "trainer", "mqtt_password": "own-secret-pass", "epochs": 2})
    source = addon_settings_source(_env(tmp_path, supervisor))
    settings = load_settings(addon_options=source)
    assert settings.mqtt.host == "core-mosquitto"
    assert settings.mqtt.port == 1883
    assert settings.mqtt.tls is False
    # the user's own login wins over the Supervisor's
    assert settings.mqtt.username == "trainer"
    assert settings.mqtt.password is not None and settings.mqtt.password.get_secret_value() == "own-secret-pass"
    assert settings.training.epochs == 2
    assert len(supervisor.requests) == 1
    assert "core-mosquitto:1883" in caplog.text
    for secret in (TOKEN, BROKER_PASSWORD, "own-secret-pass"):
        assert secret not in caplog.text


def test_supervisor_login_is_used_when_the_options_give_none(tmp_path: Path, supervisor: FakeSupervisor) -> None:
    _write_options(tmp_path, {"epochs": 2})
    settings = load_settings(addon_options=addon_settings_source(_env(tmp_path, supervisor)))
    assert settings.mqtt.username == "addons"
    assert settings.mqtt.password is not None and settings.mqtt.password.get_secret_value() == BROKER_PASSWORD


@pytest.mark.parametrize("own", [{"mqtt_username": "trainer"}, {"mqtt_password": "own-secret-pass"}])
def test_a_login_is_never_half_the_supervisors(tmp_path: Path, supervisor: FakeSupervisor, own: dict[str, str]) -> None:
    _write_options(tmp_path, own)
    settings = load_settings(addon_options=addon_settings_source(_env(tmp_path, supervisor)))
    assert settings.mqtt.host == "core-mosquitto"
    assert settings.mqtt.username != "addons"
    assert settings.mqtt.password is None or settings.mqtt.password.get_secret_value() != BROKER_PASSWORD


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HOMEIQ_MQTT__USERNAME", "from-env"),
        ("HOMEIQ_MQTT__PASSWORD", "from-env"),
        ("homeiq_mqtt__password", "from-env"),  # the settings read names in any case
        ("HOMEIQ_MQTT", '{"username": "from-env"}'),  # and a whole section as JSON
    ],
)
def test_a_login_from_the_environment_is_never_paired_with_the_supervisors(
    tmp_path: Path, supervisor: FakeSupervisor, variable: str, value: str
) -> None:
    """The environment outranks the options: half a login there went out with the Supervisor's other half."""
    _write_options(tmp_path, {})
    source = addon_settings_source(_env(tmp_path, supervisor, **{variable: value}))
    assert source["mqtt"]["host"] == "core-mosquitto"
    assert "username" not in source["mqtt"] and "password" not in source["mqtt"]


def test_no_broker_registered_is_named() -> None:
    # What the Supervisor answers when no add-on provides MQTT: `mqtt:need` does not stop the start.
    body = b'{"result": "error", "message": "Service not enabled"}'
    with FakeSupervisor(lambda _handler: (400, body)) as fake, pytest.raises(AddonError, match="no MQTT service"):
        supervisor_mqtt_service(TOKEN, fake.url)


def test_supervisor_is_not_asked_when_the_options_name_a_broker(tmp_path: Path, supervisor: FakeSupervisor) -> None:
    _write_options(tmp_path, {"mqtt_host": "broker.lan", "mqtt_port": 1884})
    settings = load_settings(addon_options=addon_settings_source(_env(tmp_path, supervisor)))
    assert supervisor.requests == []
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.username) == ("broker.lan", 1884, None)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HOMEIQ_MQTT__HOST", "env-broker"),
        ("homeiq_mqtt__host", "env-broker"),
        ("HOMEIQ_MQTT", '{"host": "env-broker"}'),
    ],
)
def test_supervisor_is_not_asked_when_the_environment_names_a_broker(
    tmp_path: Path, supervisor: FakeSupervisor, variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_options(tmp_path, {"epochs": 2})
    source = addon_settings_source(_env(tmp_path, supervisor, **{variable: value}))
    assert supervisor.requests == []
    assert source is not None and "mqtt" not in source
    monkeypatch.setenv(variable, value)
    assert load_settings(addon_options=source).mqtt.host == "env-broker"  # as the settings read it


def test_supervisor_failure_stops_the_start_with_one_line(tmp_path: Path) -> None:
    _write_options(tmp_path, {"epochs": 2})
    with FakeSupervisor(lambda _handler: (502, b"Bad Gateway")) as fake:
        env = _env(tmp_path, fake)
        with pytest.raises(AddonError, match="HTTP 502") as caught:
            addon_settings_source(env)
    assert TOKEN not in str(caught.value)


def test_serve_logs_where_the_broker_came_from(tmp_path: Path, supervisor: FakeSupervisor) -> None:
    """Said while the settings load, before the daemon's own logging was set up: it was dropped."""
    _write_options(tmp_path, {"output_dir": str(tmp_path / "out"), "source_db": str(tmp_path / "src.db")})
    env = {**os.environ, **_env(tmp_path, supervisor)}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "homeiq_trainer", "serve"], env=env, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    try:
        assert daemon.stderr is not None
        for line in daemon.stderr:  # until the daemon serves (its broker, core-mosquitto, is not here)
            lines.append(line)
            if "serving on" in line:
                break
    finally:
        daemon.terminate()
        daemon.communicate(timeout=60)
    assert any("MQTT broker from the Supervisor: core-mosquitto:1883" in line for line in lines), lines
    assert not any(BROKER_PASSWORD in line or TOKEN in line for line in lines)


def test_outside_an_add_on_there_is_nothing_to_add(tmp_path: Path) -> None:
    assert addon_settings_source({OPTIONS_PATH_ENV: str(tmp_path / "missing.json")}) is None


def test_model_cache_defaults_to_the_add_on_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_options(tmp_path, {"epochs": 2})
    monkeypatch.delenv("HF_HOME")
    env = {OPTIONS_PATH_ENV: str(tmp_path / "options.json")}
    source = addon_settings_source(env)
    assert os.environ["HF_HOME"] == str(tmp_path / "hf_cache")
    assert source is not None and source["storage"]["history_db"] == str(tmp_path / "homeiq_trainer.db")


def test_a_set_model_cache_is_kept(tmp_path: Path) -> None:
    _write_options(tmp_path, {"epochs": 2})
    addon_settings_source(_env(tmp_path))
    assert os.environ["HF_HOME"] == "/outside/hf"


def test_default_paths_are_the_add_on_paths() -> None:
    assert str(addon.DEFAULT_OPTIONS_PATH) == "/data/options.json"
    assert addon.DEFAULT_SUPERVISOR_URL == "http://supervisor"
    dockerfile = (ADDON / "Dockerfile").read_text(encoding="utf-8")
    assert f"HF_HOME=/data/{addon.HF_CACHE_NAME}" in dockerfile


# --- the image's install steps -----------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ADDON / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]  # Docker drops the backslash and the line break
            continue
        text = pending + line
        pending = ""
        keyword, _, rest = text.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_follows_the_add_on_pattern(config: dict[str, Any]) -> None:
    instructions = _dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert instructions[0] == ("ARG", "BUILD_ARCH=amd64")
    assert instructions[1] == ("FROM", "ghcr.io/home-assistant/${BUILD_ARCH}-base-debian:bookworm")
    assert ("CMD", '["/run.sh"]') in instructions
    assert ("COPY", "run.sh /run.sh") in instructions
    assert "ENTRYPOINT" not in keywords  # the base image's s6 /init stays PID 1 (init: false)
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "HF_HOME=/data/hf_cache" in env
    # Docker's SIGTERM reaches the daemon itself, which has config.yaml's timeout to cancel a run and
    # exit; s6's grace, which it sleeps out in full after that, stays short.
    assert "S6_CMD_RECEIVE_SIGNALS=1" in env
    grace_ms = int(re.search(r"S6_KILL_GRACETIME=(\d+)", env).group(1))  # type: ignore[union-attr]
    assert grace_ms <= 5000


def _pip_runs() -> list[str]:
    return [rest for keyword, rest in _dockerfile_instructions() if keyword == "RUN" and "pip install" in rest]


def test_cpu_torch_is_installed_before_the_package() -> None:
    torch_run, package_run = _pip_runs()
    assert shlex.split(torch_run) == [
        "pip",
        "install",
        "--no-cache-dir",
        "torch==2.13.0",
        "--index-url",
        "https://download.pytorch.org/whl/cpu",
    ]
    assert "HOMEIQ_TRAINER_SOURCE" in package_run and "torch" not in package_run
    # A dependency that wants another torch fails the build instead of pulling PyPI's CUDA build.
    instructions = _dockerfile_instructions()
    constraint = next(i for i, (k, rest) in enumerate(instructions) if k == "ENV" and "PIP_CONSTRAINT=" in rest)
    package = next(i for i, (k, rest) in enumerate(instructions) if k == "RUN" and rest == package_run)
    assert constraint < package


def _source_tree(destination: Path) -> Path:
    """The files a build from source sees: tracked and untracked-but-not-ignored, as git lists them."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the source tree")
def test_package_install_step_gives_an_importable_package(tmp_path: Path) -> None:
    """Runs the Dockerfile's package install step as written, in a throwaway venv, from this source tree.

    PIP_NO_DEPS keeps it to the package itself (seconds instead of minutes): the dependencies are the
    released ones from PyPI and were installed the same way, with the CPU torch first, by hand.
    """
    (_, package_run) = _pip_runs()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    source = _source_tree(tmp_path / "src")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv),
        "HOMEIQ_TRAINER_SOURCE": str(source),
        "BUILD_VERSION": version,
        "PIP_NO_DEPS": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    subprocess.run(["bash", "-o", "pipefail", "-c", package_run], env=env, check=True, timeout=240)

    check = (
        "import importlib.metadata, homeiq_trainer, homeiq_trainer.addon;"
        "print(importlib.metadata.version('homeiq-trainer'), homeiq_trainer.__file__)"
    )
    # run outside the source tree, so the import comes from the venv and not from a checkout
    shown = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c", check], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.split()
    assert shown[0] == version
    assert Path(shown[1]).is_relative_to(venv)
    assert (venv / "bin" / "homeiq-trainer").is_file()
    # PIP_NO_DEPS reached pip: no dependency was installed
    assert not list((venv / "lib").glob("python*/site-packages/pydantic"))


def _run_package_step(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The package install step with a stand-in `pip` that only prints what it was asked to install."""
    (_, package_run) = _pip_runs()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_pip = bin_dir / "pip"
    fake_pip.write_text('#!/bin/sh\necho "$@"\n', encoding="utf-8")
    fake_pip.chmod(0o755)
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", package_run],
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
    )


def test_add_on_build_installs_the_release_of_its_version(tmp_path: Path, config: dict[str, Any]) -> None:
    result = _run_package_step(tmp_path, BUILD_VERSION=config["version"])
    assert result.returncode == 0, result.stderr
    expected = f"https://github.com/homeiq/homeiq-trainer/archive/refs/tags/v{config['version']}.tar.gz"
    assert result.stdout.split() == ["install", "--no-cache-dir", expected]
    assert expected.startswith(config["url"])


def test_build_without_a_version_or_source_fails_clearly(tmp_path: Path) -> None:
    result = _run_package_step(tmp_path)
    assert result.returncode != 0
    assert "BUILD_VERSION" in result.stderr and result.stdout == ""
