"""The README's "Serving the adapter" snippet, run as written against a served tiny adapter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from homeiq_trainer.training.evaluate import answer

from .conftest import SettingsFactory, train_and_serve

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET_PATH = "data/ask_ai_soft_prompt/latest"


def _snippet() -> str:
    section = README.read_text(encoding="utf-8").split("## Serving the adapter", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "no python block under 'Serving the adapter'"
    return match.group(1)


def test_serving_snippet_loads_latest_and_answers(make_settings: SettingsFactory) -> None:
    code = _snippet()
    assert len(code.strip().splitlines()) <= 10 and SNIPPET_PATH in code
    settings = make_settings(data={"max_samples": 60})
    latest = train_and_serve(settings)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code.replace(SNIPPET_PATH, str(latest))], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    query = "Turn on the porch light at sunset"
    expected = answer(latest.resolve(), query, settings.training.source_max_tokens, max_new_tokens=64)
    assert done.stdout == expected + "\n"
