"""Hostile and malformed commands: at least 10,000 fuzzed payloads, each answered once with an error,
none starting a run or touching the history or the output dir."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.history import run_to_dict
from homeiq_trainer.messages import PLAIN_COMMANDS
from homeiq_trainer.parameters import PARAMETERS

from ..conftest import Broker, SettingsFactory, record, tally
from ..fakes import RefusingLauncher
from .conftest import CMD, RESP, Client, daemon_settings

IN_PROCESS = "payloads fuzzed in-process"

REQUEST_ID = re.compile(r"[A-Za-z0-9_.:@/+-]{1,128}")  # matched whole (fullmatch): no trailing newline
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# --- strategies -----------------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "../",
    "./",
    "~",
    "~/.ssh/id_rsa",
    "/root/.cache/huggingface",
    "file:///etc/passwd",
    "http://evil.example/model.bin",
    "https://huggingface.co/evil/model",
    "hf://evil/model",
    "\\\\server\\share",
    "C:\\Windows\\System32",
    "latest/../../x",
    "latest/..",
    "run_20250101_000000/../../etc",
    "run_20250101_000000/",
    "/run_20250101_000000",
    "run_20250101_000000\x00",
    "%2e%2e%2f%2e%2e%2f",
    "..%c0%af",
    "\x00",
    "\n",
    "$(touch /tmp/pwned)",
    "`id`",
    "'; DROP TABLE training_runs; --",
    "evil/model",
    "gpt2",
    "google/flan-t5-small/../../../../etc",
    "a" * 600,
    "🙂" * 40,
    "\u202e",
    "latest\n",
]
hostile_text = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=200),
    st.from_regex(r"\A(\.\./){1,8}[a-z/]{0,20}\Z"),
    st.from_regex(r"\A(https?|file|ftp)://[a-z./]{1,30}\Z"),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40))


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)


json_value = st.recursive(json_scalar, _containers, max_leaves=12)
wrong_typed = st.one_of(
    st.lists(json_scalar, max_size=3),
    st.dictionaries(st.text(max_size=5), json_scalar, max_size=3),
    st.text(max_size=20).filter(lambda s: s.strip() != ""),
    st.booleans(),
)
not_a_string = st.one_of(
    st.lists(json_scalar, max_size=3),
    st.dictionaries(st.text(max_size=5), json_scalar, max_size=3),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
)

# The bounds come from the one declaration of the parameters (parameters.py), plus the start-only one.
INT_FIELDS = {p.name: (int(p.ge or 0), int(p.le or 0)) for p in PARAMETERS if p.kind is int}
INT_FIELDS["min_new_samples"] = (0, 1_000_000)
FLOAT_FIELDS = {p.name: p for p in PARAMETERS if p.kind is float}


def out_of_range(field: str) -> st.SearchStrategy[Any]:
    if field in INT_FIELDS:
        low, high = INT_FIELDS[field]
        return st.one_of(
            st.sampled_from([low - 1, high + 1, -1, -(2**63), 2**63, 10**30]),
            st.integers(max_value=low - 1),
            st.integers(min_value=high + 1),
        )
    declared = FLOAT_FIELDS[field]
    low = declared.ge or 0.0
    beyond = (
        [declared.lt, declared.lt + 0.5] if declared.lt is not None else [declared.le * 1.0000001, 2.0 * declared.le]
    )  # type: ignore[operator]
    return st.sampled_from([*beyond, low - 1e-9, -0.1, 1e308, -1e308])


def valid_params() -> st.SearchStrategy[dict[str, Any]]:
    optional: dict[str, st.SearchStrategy[Any]] = {
        name: st.integers(low, high) for name, (low, high) in INT_FIELDS.items()
    }
    for name, declared in FLOAT_FIELDS.items():
        high = declared.le if declared.le is not None else declared.lt
        optional[name] = st.floats(declared.ge, high, exclude_max=declared.le is None)
    return st.fixed_dictionaries({}, optional=optional)


def request_ids() -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), st.from_regex(r"\A[A-Za-z0-9_.:@/+-]{1,128}\Z"), st.uuids().map(str))


@st.composite
def json_commands(draw: st.DrawFn, allowed_base_models: tuple[str, ...]) -> dict[str, Any] | Any:
    """A JSON command with at least one defect that must make the daemon refuse it."""
    body: dict[str, Any] = {"action": draw(st.sampled_from(PLAIN_COMMANDS))}
    rid = draw(request_ids())
    if rid is not None:
        body["request_id"] = rid
    if draw(st.booleans()):
        body["triggered_by"] = draw(st.one_of(st.from_regex(r"\A[A-Za-z0-9_.:@ -]{1,64}\Z"), st.just("..")))
    if draw(st.booleans()):
        body["params"] = draw(valid_params())
    defect = draw(
        st.sampled_from(
            [
                "extra_key",
                "extra_param",
                "range",
                "type",
                "base_model",
                "resume_from",
                "action",
                "params_elsewhere",
                "triggered_by",
                "request_id",
                "params_not_object",
                "not_an_object",
                "unknown_run",
            ]
        )
    )
    params = (
        body.setdefault("params", {})
        if defect in ("extra_param", "range", "type", "base_model", "resume_from", "unknown_run")
        else None
    )
    if params is not None:
        body["action"] = "start"
    if defect == "extra_key":
        key = draw(st.text(max_size=30).filter(lambda k: k not in ("action", "request_id", "triggered_by", "params")))
        body[key] = draw(json_value)
    elif defect == "extra_param":
        known = set(INT_FIELDS) | set(FLOAT_FIELDS) | {"resume_from", "base_model"}
        key = draw(
            st.one_of(
                st.sampled_from(
                    [
                        "trust_remote_code",
                        "output_dir",
                        "source_db",
                        "history_db",
                        "device",
                        "model_path",
                        "__class__",
                        "__proto__",
                    ]
                ),
                st.text(max_size=30),
            ).filter(lambda k: k not in known)
        )
        params[key] = draw(st.one_of(st.just(True), hostile_text, json_value))  # type: ignore[index]
    elif defect == "range":
        name = draw(st.sampled_from([*INT_FIELDS, *FLOAT_FIELDS]))
        params[name] = draw(out_of_range(name))  # type: ignore[index]
    elif defect == "type":
        name = draw(st.sampled_from([*INT_FIELDS, *FLOAT_FIELDS, "resume_from", "base_model"]))
        params[name] = draw(
            wrong_typed.filter(lambda v: not isinstance(v, str) or name not in ("resume_from", "base_model"))
        )  # type: ignore[index]  # noqa: E501
    elif defect == "base_model":
        params["base_model"] = draw(hostile_text.filter(lambda s: s not in allowed_base_models))  # type: ignore[index]
    elif defect == "resume_from":
        params["resume_from"] = draw(
            hostile_text.filter(lambda s: s != "latest" and not re.fullmatch(r"run_\d{8}_\d{6}(_\d{1,3})?", s))
        )  # type: ignore[index]  # noqa: E501
    elif defect == "unknown_run":
        # Well-formed but absent (the output dir is empty): refused as unknown, never followed.
        params["resume_from"] = draw(st.one_of(st.just("latest"), st.from_regex(r"\Arun_\d{8}_\d{6}(_\d{1,3})?\Z")))  # type: ignore[index]  # noqa: E501
    elif defect == "action":
        body["action"] = draw(
            st.one_of(
                st.text(max_size=20).filter(lambda a: a not in PLAIN_COMMANDS),
                not_a_string,
                st.sampled_from(["START", "Start", " start", "stop", "train", "exec"]),
            )
        )
    elif defect == "params_elsewhere":
        body["action"] = draw(st.sampled_from(["cancel", "status", "runs"]))
        body["params"] = draw(valid_params())
    elif defect == "triggered_by":
        body["triggered_by"] = draw(
            st.one_of(
                st.sampled_from(["", "x" * 65, "../../etc/passwd", "a/b", "http://x", "\n", "é"]),
                hostile_text.filter(lambda s: not re.fullmatch(r"[A-Za-z0-9_.:@ -]{1,64}", s)),
                not_a_string,
            )
        )
    elif defect == "request_id":
        body["request_id"] = draw(
            st.one_of(
                st.sampled_from(["", "x" * 129, "../../etc/passwd\n", "a b", "<script>"]),
                hostile_text.filter(lambda s: not REQUEST_ID.fullmatch(s)),
                st.integers(),
                st.lists(st.integers(), max_size=2),
            )
        )
    elif defect == "params_not_object":
        body["action"] = "start"
        body["params"] = draw(
            st.one_of(st.lists(json_scalar, max_size=3), st.text(max_size=10), st.integers(), st.booleans())
        )
    elif defect == "not_an_object":
        return draw(st.one_of(st.lists(json_value, max_size=4), json_scalar))
    return body


def encode(draw: st.DrawFn, value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 0, 2])))
    padding = draw(st.sampled_from(["", " ", "\n", "\t  "]))
    return (padding + text + padding).encode()


@st.composite
def json_payloads(draw: st.DrawFn, allowed: tuple[str, ...]) -> bytes:
    return encode(draw, draw(json_commands(allowed)))


def _is_plain_command(payload: bytes) -> bool:
    try:
        return payload.decode("utf-8").strip().lower() in PLAIN_COMMANDS
    except UnicodeDecodeError:
        return False


raw_bytes = st.binary(max_size=2048).filter(lambda b: not _is_plain_command(b))
invalid_utf8 = st.tuples(
    st.binary(max_size=64),
    st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88", b"\xe2\x82", b"\x80"]),
    st.binary(max_size=64),
).map(
    lambda t: (
        b'{"action": "start", "request_id": "' + t[0].hex().encode() + b'", "x": "' + t[1] + t[2] + b'"}'
        if t[0]
        else t[1] + t[2]
    )
)


@st.composite
def deep_or_huge(draw: st.DrawFn, max_bytes: int) -> bytes:
    kind = draw(st.sampled_from(["deep_list", "deep_object", "deep_params", "huge_string", "huge_list", "over"]))
    n = draw(st.integers(1, max_bytes // 6))
    rid = draw(st.uuids().map(str))
    if kind == "deep_list":
        return b"[" * n + b"]" * draw(st.integers(0, n))
    if kind == "deep_object":
        return b'{"a":' * n + b"1" + b"}" * draw(st.integers(0, n))
    if kind == "deep_params":
        depth = draw(st.integers(1, 2000))
        return (f'{{"action":"start","request_id":"{rid}","params":{{"x":' + "[" * depth + "]" * depth + "}}").encode()
    if kind == "huge_string":
        return json.dumps({"action": "start", "request_id": rid, "triggered_by": "x" * (64 + n)}).encode()
    if kind == "huge_list":
        return json.dumps({"action": "start", "request_id": rid, "params": {"epochs": [1] * (n // 3)}}).encode()
    return json.dumps({"request_id": rid, "action": "start", "pad": "x" * (max_bytes + n)}).encode()


# --- the checks -----------------------------------------------------------------------------------


def expected_request_id(payload: bytes, max_bytes: int) -> str | None:
    """The request id a sender could fairly expect back: a well-formed one in a JSON object."""
    if len(payload) > max_bytes:
        match = re.search(rb'"request_id"\s*:\s*"([A-Za-z0-9_.:@/+-]{1,128})"', payload[:1024])
        return match.group(1).decode() if match else None
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    value = raw.get("request_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and REQUEST_ID.fullmatch(value) else None


def check_refused(app: TrainerApp, payload: bytes, response_text: str) -> dict[str, Any]:
    response = json.loads(response_text)
    assert response["status"] == "error", (payload[:300], response)
    assert response["error"]["code"] and response["error"]["message"], response
    assert len(response_text) < 4096, "a refusal never echoes a large input back"
    rid = expected_request_id(payload, app.settings.daemon.max_payload_bytes)
    if rid is not None:
        assert response["request_id"] == rid, (payload[:300], response)
    assert app.runner.active is None
    return response


def snapshot(app: TrainerApp) -> tuple[list[dict[str, Any]], list[str]]:
    output_dir = app.settings.storage.output_dir
    files = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*")) if output_dir.exists() else []
    return [run_to_dict(r) for r in app.store.recent(1000)], files


@pytest.fixture(params=[16384, 1_048_576], ids=["default-limit", "largest-limit"])
def fuzz_app(request: pytest.FixtureRequest, make_settings: SettingsFactory) -> Iterator[TrainerApp]:
    """The daemon's command path in-process (it connects only on start(), which is never called)."""
    settings = make_settings(daemon={"max_payload_bytes": request.param}, mqtt={"port": 1})
    app = TrainerApp(settings, launcher=RefusingLauncher())
    app.start(connect=False)
    before = snapshot(app)
    yield app
    assert snapshot(app) == before
    app.stop()


def _fuzz(app: TrainerApp, strategy: st.SearchStrategy[bytes], examples: int) -> int:
    """Feed `examples` payloads to the handler; returns how many it checked."""
    seen = [0]

    @settings(FUZZ, max_examples=examples)
    @given(payload=strategy)
    def check(payload: bytes) -> None:
        check_refused(app, payload, app.handle_command(payload))
        seen[0] += 1

    check()
    assert seen[0] >= examples
    return seen[0]


def _mixed(app: TrainerApp) -> st.SearchStrategy[bytes]:
    allowed = app.settings.allowed_base_models()
    return st.one_of(
        json_payloads(allowed),
        json_payloads(allowed),
        raw_bytes,
        invalid_utf8,
        deep_or_huge(app.settings.daemon.max_payload_bytes),
    )


def test_fuzz_quick(make_settings: SettingsFactory) -> None:
    """The default suite's share: 1,000 mixed payloads (the full 10,000 run with `-m slow`)."""
    app = TrainerApp(make_settings(), launcher=RefusingLauncher())
    app.start(connect=False)
    before = snapshot(app)
    _fuzz(app, _mixed(app), 1000)
    assert snapshot(app) == before
    app.stop()


@pytest.mark.slow
def test_fuzz_json_commands(fuzz_app: TrainerApp) -> None:
    tally(IN_PROCESS, _fuzz(fuzz_app, json_payloads(fuzz_app.settings.allowed_base_models()), 3000))


@pytest.mark.slow
def test_fuzz_random_bytes_and_invalid_utf8(fuzz_app: TrainerApp) -> None:
    tally(IN_PROCESS, _fuzz(fuzz_app, st.one_of(raw_bytes, invalid_utf8), 1500))


@pytest.mark.slow
def test_fuzz_deep_and_huge_json(fuzz_app: TrainerApp) -> None:
    tally(IN_PROCESS, _fuzz(fuzz_app, deep_or_huge(fuzz_app.settings.daemon.max_payload_bytes), 500))


def test_oversized_payload_costs_nothing_to_refuse(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from homeiq_trainer import commands

    app = TrainerApp(make_settings(), launcher=RefusingLauncher())
    app.start(connect=False)
    limit, real_loads = app.settings.daemon.max_payload_bytes, commands.json.loads

    def loads(text: str | bytes, *args: Any, **kwargs: Any) -> Any:
        assert len(text) <= limit, f"a payload of {len(text):,} bytes was parsed"
        return real_loads(text, *args, **kwargs)

    monkeypatch.setattr(commands.json, "loads", loads)
    payload = b'{"request_id": "big-1", "action": "start", "pad": [' + b"1," * 20_000_000 + b"1]}"
    response = real_loads(app.handle_command(payload))
    assert response["error"]["code"] == "payload_too_large" and response["request_id"] == "big-1"
    app.stop()


def test_fuzz_through_the_broker(make_settings: SettingsFactory, broker: Broker, tmp_path: Path) -> None:
    cfg = daemon_settings(make_settings, broker.port, daemon={"max_payload_bytes": 65536})
    allowed = cfg.allowed_base_models()
    payloads: list[bytes] = []

    @settings(FUZZ, max_examples=300)
    @given(
        payload=st.one_of(json_payloads(allowed), json_payloads(allowed), raw_bytes, invalid_utf8, deep_or_huge(65536))
    )
    def collect(payload: bytes) -> None:
        payloads.append(payload)

    collect()
    big = b'{"request_id": "broker-big", "action": "start", "pad": "' + b"x" * (16 * 1024 * 1024) + b'"}'
    payloads += [big, b"[" * 60000, b"\xff" * 70000]
    app = TrainerApp(cfg, launcher=RefusingLauncher())
    app.start()
    before = snapshot(app)
    client = Client(broker.port, (RESP,))
    try:
        assert app.link.wait_connected(10)
        for payload in payloads:
            client.client.publish(CMD, payload, qos=1)
        deadline = time.monotonic() + 180  # generous: a loaded CI machine, and a 16 MB payload in the mix
        while client.count(RESP) < len(payloads) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Answers come in order: once a later command is answered, nothing more from the fuzz may arrive.
        marker = client.request(CMD, RESP, {"action": "status", "request_id": "fuzz-marker"}, timeout=30)
        responses = [json.loads(p) for p in client.messages(RESP)]
        responses = [r for r in responses if r.get("request_id") != marker["request_id"]]
        ids = {r["request_id"] for r in responses}
        missing = [p[:80] for p in payloads if expected_request_id(p, 65536) not in ids]
        assert len(responses) == len(payloads), (missing, len(client.messages(RESP)))
        expected: dict[str, int] = {}
        for payload in payloads:
            rid = expected_request_id(payload, cfg.daemon.max_payload_bytes)
            if rid is not None:
                expected[rid] = expected.get(rid, 0) + 1
        got: dict[str, int] = {}
        for response in responses:
            assert response["status"] == "error", response
            if response["request_id"] is not None:
                got[response["request_id"]] = got.get(response["request_id"], 0) + 1
        for rid, count in expected.items():
            # A refusal before parsing (`overloaded` when the loaded machine lets the queue fill) reads the
            # id from the payload's first KiB: a payload too deep for json.loads that carries this id too
            # (hypothesis repeats values) may get it back. At most that many more, never fewer.
            others = sum(1 for p in payloads if rid.encode() in p and expected_request_id(p, 65536) != rid)
            assert count <= got.get(rid, 0) <= count + others, (rid, count, got.get(rid), others)
        assert app.runner.active is None
        assert marker["status"] == "ok"  # still serving
    finally:
        client.close()
        app.stop()
    record("payloads fuzzed through the broker", len(payloads))
    app2 = TrainerApp(cfg, launcher=RefusingLauncher())
    app2.start(connect=False)
    assert snapshot(app2) == before
    app2.stop()
