"""Command parsing: plain button payloads and strict JSON. Pure, no broker."""

from __future__ import annotations

import json

import pytest

from homeiq_trainer.commands import CommandError, parse_command

LIMIT = 16384


@pytest.mark.parametrize("word", ["start", "cancel", "status", "runs", " START\n"])
def test_plain_words_are_button_presses(word: str) -> None:
    command = parse_command(word.encode(), LIMIT)
    assert command.action == word.strip().lower()
    assert command.triggered_by == "button" and command.params is None


def test_json_start_with_params() -> None:
    body = {
        "action": "start",
        "request_id": "nightly-2025-11-25",
        "triggered_by": "automation",
        "params": {
            "epochs": 2,
            "max_samples": 500,
            "learning_rate": 0.001,
            "batch_size": 4,
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.1,
            "min_new_samples": 25,
        },
    }
    command = parse_command(json.dumps(body).encode(), LIMIT)
    assert command.params is not None and command.params.min_new_samples == 25
    params = command.params.train_params()
    assert params.epochs == 2 and params.lora_r == 8
    resume = parse_command(b'{"action": "start", "params": {"resume_from": "latest", "epochs": 1}}', LIMIT)
    assert resume.params is not None and resume.params.train_params().resume_from == "latest"
    assert "min_new_samples" not in params.model_dump()
    assert parse_command(b'{"action": "start"}', LIMIT).triggered_by == "mqtt"


@pytest.mark.parametrize(
    ("payload", "code", "names"),
    [
        (b"x" * (LIMIT + 1), "payload_too_large", "limit"),
        (b"\xc3\x28", "invalid_payload", "UTF-8"),
        (b"go", "invalid_payload", "start"),
        (b"{nope", "invalid_json", "JSON"),
        (b'{"action": "train"}', "invalid_command", "action"),
        (b'{"action": "start", "params": {"epochs": 0}}', "invalid_command", "params.epochs"),
        (b'{"action": "start", "params": {"epochs": "3"}}', "invalid_command", "params.epochs"),
        (b'{"action": "start", "params": {"colour": 1}}', "invalid_command", "params.colour"),
        (b'{"action": "start", "params": {"learning_rate": NaN}}', "invalid_command", "finite number"),
        (b'{"action": "start", "params": {"learning_rate": -Infinity}}', "invalid_command", "finite number"),
        (b'{"action": "start", "params": {"resume_from": "/etc/passwd"}}', "invalid_command", "resume_from"),
        (b'{"action": "start", "params": {"base_model": ""}}', "invalid_command", "base_model"),
        (b'{"action": "start", "request_id": 7}', "invalid_command", "request_id"),
        (b'{"action": "status", "params": {}}', "invalid_command", "only accepted"),
        (b'{"action": "start", "unknown": true}', "invalid_command", "unknown"),
        (
            b'{"action": "start", "params": {"resume_from": "latest", "lora_r": 4}}',
            "invalid_command",
            "resumed adapter",
        ),
    ],
)
def test_bad_commands_name_the_problem(payload: bytes, code: str, names: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(payload, LIMIT)
    assert info.value.code == code
    assert names in str(info.value)
