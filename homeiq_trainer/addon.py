"""The Home Assistant add-on environment: UI options and the Supervisor's MQTT broker, as settings.

The add-on's start script only runs `homeiq-trainer serve`; everything that depends on being an add-on
happens here, where it can be tested. Three things come from the add-on environment:

- `/data/options.json`, written by the Supervisor from the form in the UI, mapped onto the same
  nested settings the TOML file and the environment use (`OPTION_MAP`);
- the MQTT broker from the Supervisor's services API (`mqtt:need`) when the options name no broker;
- the add-on's storage layout: the folder that holds `options.json` (`/data` in the add-on) also holds
  homeiq-trainer's history database and the Hugging Face model cache (`HF_HOME`, set in
  `os.environ` when unset so that the training process, which inherits it, caches models there).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

_LOGGER = logging.getLogger(__name__)

OPTIONS_PATH_ENV = "HOMEIQ_ADDON_OPTIONS"
"""Overrides the path of the add-on options file (for tests)."""
SUPERVISOR_URL_ENV = "HOMEIQ_SUPERVISOR_URL"
"""Overrides the Supervisor's address (for tests)."""
SUPERVISOR_TOKEN_ENV = "SUPERVISOR_TOKEN"
"""Set by the Supervisor in every add-on container."""

DEFAULT_OPTIONS_PATH = Path("/data/options.json")
DEFAULT_SUPERVISOR_URL = "http://supervisor"
SUPERVISOR_TIMEOUT_S = 5.0
HISTORY_DB_NAME = "homeiq_trainer.db"
"""The history database's file name in the add-on's data folder, unless `history_db` says otherwise."""
HF_CACHE_NAME = "hf_cache"
"""The model cache's folder name in the add-on's data folder (excluded from backups in config.yaml)."""

_MAX_RESPONSE_BYTES = 64 * 1024
_MAX_MESSAGE_CHARS = 200

OPTION_MAP: Mapping[str, tuple[str, ...]] = {
    "source": ("data", "source"),
    "source_password": ("data", "source_password"),
    "source_db": ("data", "source_db"),
    "max_samples": ("data", "max_samples"),
    "output_dir": ("storage", "output_dir"),
    "history_db": ("storage", "history_db"),
    "keep_runs": ("storage", "keep_runs"),
    "homeiq_runs": ("storage", "homeiq_runs"),
    "base_model": ("training", "base_model"),
    "allowed_base_models": ("training", "allowed_base_models"),
    "epochs": ("training", "epochs"),
    "learning_rate": ("training", "learning_rate"),
    "batch_size": ("training", "batch_size"),
    "lora_rank": ("lora", "r"),
    "mqtt_host": ("mqtt", "host"),
    "mqtt_port": ("mqtt", "port"),
    "mqtt_username": ("mqtt", "username"),
    "mqtt_password": ("mqtt", "password"),
    "mqtt_tls": ("mqtt", "tls"),
    "mqtt_ca_certs": ("mqtt", "ca_certs"),
    "base_topic": ("mqtt", "base_topic"),
    "discovery_prefix": ("mqtt", "discovery_prefix"),
    "promotion_policy": ("promotion", "policy"),
    "log_level": ("log_level",),
}
"""Every add-on option (the flat names of the UI form) and the settings key it sets."""

_PATH_OPTIONS = frozenset({"source_db", "output_dir", "history_db", "mqtt_ca_certs"})
# What the Supervisor's broker may fill in; options the user set win over it.
_BROKER_KEYS = ("host", "port", "username", "password", "tls")


class AddonError(Exception):
    """The add-on environment cannot be used; a one-line message that never contains a secret."""


def load_addon_options(path: Path | None = None) -> dict[str, Any] | None:
    """The add-on options as nested settings, or None when there is no options file (not an add-on)."""
    path = path or Path(os.environ.get(OPTIONS_PATH_ENV) or DEFAULT_OPTIONS_PATH)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AddonError(f"cannot read the add-on options {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AddonError(f"the add-on options {path} are not UTF-8 text") from None
    try:
        options = json.loads(text)
    except ValueError as exc:  # the decoder's message has a position, never the content
        raise AddonError(f"the add-on options {path} are not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise AddonError(f"the add-on options {path} are not a JSON object")

    nested: dict[str, Any] = {}
    for name, value in options.items():
        if name not in OPTION_MAP:
            raise AddonError(f"unknown add-on option {name!r} in {path}")
        if isinstance(value, list):  # a row of a list left blank in the form is no entry
            value = [item for item in value if not (isinstance(item, str) and not item.strip())]
        if value is None or value == "" or value == []:
            continue  # left empty in the form: the default applies
        if name in _PATH_OPTIONS and not (isinstance(value, str) and PurePosixPath(value).is_absolute()):
            raise AddonError(f"add-on option {name!r} must be an absolute path, such as /share/homeiq/...")
        if name == "source" and not _url_or_absolute(value):
            raise AddonError("add-on option 'source' must be a URL (postgresql://...) or an absolute path")
        *sections, key = OPTION_MAP[name]
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value

    # An add-on keeps its own state in its data folder, which the Supervisor persists and backs up;
    # the relative defaults of a source checkout would land in the container's throwaway layer.
    storage = nested.setdefault("storage", {})
    storage.setdefault("history_db", str(path.parent / HISTORY_DB_NAME))
    return nested


def _url_or_absolute(value: object) -> bool:
    return isinstance(value, str) and ("://" in value or PurePosixPath(value).is_absolute())


def supervisor_mqtt_service(
    token: str, url: str | None = None, timeout_s: float = SUPERVISOR_TIMEOUT_S
) -> dict[str, Any]:
    """The broker the Supervisor offers to add-ons with `mqtt:need`: host, port, username, password, tls."""
    base = (url or DEFAULT_SUPERVISOR_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise AddonError(f"the Supervisor URL must start with http:// or https://, not {base!r}")
    request = urllib.request.Request(
        f"{base}/services/mqtt",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )
    # The Supervisor is on the add-on's internal network; an HTTP(S)_PROXY from the environment must
    # not capture the request (and the token with it).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = response.read(_MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as exc:
        detail = _supervisor_message(exc.read(_MAX_RESPONSE_BYTES) if exc.fp else b"")
        if exc.code == 400 and "not enabled" in detail:  # `mqtt:need` does not stop the add-on's start
            raise AddonError(
                "no MQTT service: no broker add-on (e.g. Mosquitto) has registered with the Supervisor; "
                "install and start it, or set mqtt_host"
            ) from None
        message = f"the Supervisor refused the MQTT service query at {base}: HTTP {exc.code}{detail}"
        raise AddonError(_scrub(message, token)) from None
    except (OSError, http.client.HTTPException) as exc:  # URLError, refused, reset, timeouts
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise AddonError(_scrub(f"cannot reach the Supervisor at {base}: {reason}", token)) from None

    try:
        payload = json.loads(body)
    except ValueError:
        raise AddonError(f"the Supervisor at {base} did not answer the MQTT service query with JSON") from None
    if not isinstance(payload, dict) or payload.get("result") != "ok" or not isinstance(payload.get("data"), dict):
        detail = _supervisor_message(body)
        raise AddonError(_scrub(f"the Supervisor at {base} has no MQTT service for this add-on{detail}", token))
    data = payload["data"]

    host = data.get("host")
    port = data.get("port")
    if not isinstance(host, str) or not host:
        raise AddonError(f"the Supervisor's MQTT service at {base} names no broker host")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise AddonError(f"the Supervisor's MQTT service at {base} names no valid broker port") from None
    if not 1 <= port <= 65535:
        raise AddonError(f"the Supervisor's MQTT service at {base} names no valid broker port")
    username = data.get("username")
    password = data.get("password")
    return {
        "host": host,
        "port": port,
        "username": str(username) if username not in (None, "") else None,
        "password": str(password) if password not in (None, "") else None,
        "tls": bool(data.get("ssl", False)),
    }


def addon_settings_source(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Everything the add-on environment contributes to the settings, or None outside an add-on.

    Pass the result to `load_settings(addon_options=...)`. When the options file exists, also sets
    `HF_HOME` in `os.environ` to the model cache in the add-on's data folder, unless it is set already.
    """
    env = os.environ if env is None else env
    options_path = Path(env.get(OPTIONS_PATH_ENV) or DEFAULT_OPTIONS_PATH)
    options = load_addon_options(options_path)
    token = env.get(SUPERVISOR_TOKEN_ENV) or None
    if options is None and token is None:
        return None
    source: dict[str, Any] = options or {}

    if options is not None and "HF_HOME" not in env and "HF_HOME" not in os.environ:
        os.environ["HF_HOME"] = str(options_path.parent / HF_CACHE_NAME)

    mqtt = source.get("mqtt", {})
    # The environment outranks add-on options in load_settings, so a host given there also means the
    # Supervisor has nothing to add (and must not be asked: outside Home Assistant it does not exist).
    from homeiq_trainer.overrides import pinned_settings  # here: this module needs only the standard library

    # In any spelling the settings read: `homeiq_mqtt__host`, or `HOMEIQ_MQTT='{"host": ...}'` (empty ones are none).
    from_env = pinned_settings({name: value for name, value in env.items() if value})
    if token is not None and not mqtt.get("host") and "mqtt.host" not in from_env:
        broker = supervisor_mqtt_service(token, env.get(SUPERVISOR_URL_ENV) or None)
        mqtt = source.setdefault("mqtt", {})
        # A login is a pair: a user name from the options never goes out with the Supervisor's password.
        own_login = any(key in mqtt or f"mqtt.{key}" in from_env for key in ("username", "password"))
        for key in _BROKER_KEYS:
            if key in ("username", "password") and own_login:
                continue
            if broker[key] is not None:
                mqtt.setdefault(key, broker[key])
        _LOGGER.info(
            "MQTT broker from the Supervisor: %s:%s%s",
            mqtt["host"],
            mqtt["port"],
            " (TLS)" if mqtt["tls"] else "",
        )
    return source


def _supervisor_message(body: bytes) -> str:
    """The Supervisor's own error message from a JSON body, as ': message', else ''."""
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    message = payload.get("message") if isinstance(payload, dict) else None
    if not isinstance(message, str) or not message.strip():
        return ""
    return ": " + " ".join(message.split())[:_MAX_MESSAGE_CHARS]


def _scrub(message: str, secret: str) -> str:
    """The message with the secret blanked out, whatever echoed it."""
    return message.replace(secret, "***") if secret else message
