"""No code or data from a command is ever executed or followed: no remote code, resume targets only
inside the output dir, base models only from the allow-list."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from homeiq_trainer.app import TrainerApp
from homeiq_trainer.messages import TrainParams
from homeiq_trainer.training import artifacts
from homeiq_trainer.training.artifacts import ArtifactError
from homeiq_trainer.training.engine import RunInputError, load_base_model
from homeiq_trainer.training.run import execute_run

from ..conftest import SettingsFactory
from ..fakes import RefusingLauncher

PACKAGE = Path(__file__).resolve().parents[2] / "homeiq_trainer"
PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('executed')\n"


def test_trust_remote_code_is_never_enabled_in_the_source() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"trust_remote_code\s*[=:]\s*([^,)\s]+)", text):
            if match.group(1) != "False":
                offenders.append(f"{path.name}: {match.group(0)}")
        if re.search(r"HF_.*TRUST_REMOTE_CODE|trust_remote_code\s*\*\*|\*\*.*trust_remote", text):
            offenders.append(f"{path.name}: indirect")
    assert offenders == []


def _booby_trapped_model(tiny_model: Path, directory: Path, model_type: str) -> tuple[Path, Path]:
    model = directory / f"model-{model_type}"
    shutil.copytree(tiny_model, model)
    marker = directory / f"executed-{model_type}"
    for module in ("modeling_evil", "configuration_evil", "tokenization_evil"):
        (model / f"{module}.py").write_text(PAYLOAD.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForSeq2SeqLM": "modeling_evil.EvilModel",
    }
    (model / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return model, marker


def test_model_with_custom_code_is_loaded_without_running_it(tiny_model: Path, tmp_path: Path) -> None:
    # A known architecture with an auto_map: the built-in T5 class is used, the repo's code never runs.
    model_dir, marker = _booby_trapped_model(tiny_model, tmp_path, "t5")
    tokenizer, model = load_base_model(str(model_dir), "cpu", False)
    assert type(model).__module__.startswith("transformers.") and not marker.exists()
    # An architecture only the repo's code knows: refused, still without running it.
    model_dir, marker = _booby_trapped_model(tiny_model, tmp_path, "evil")
    with pytest.raises(RunInputError, match="contains custom code"):  # one line for the run's error
        load_base_model(str(model_dir), "cpu", False)
    assert not marker.exists()


def test_whole_run_on_a_booby_trapped_model_runs_no_code(
    make_settings: SettingsFactory, tiny_model: Path, tmp_path: Path
) -> None:
    model_dir, marker = _booby_trapped_model(tiny_model, tmp_path, "t5")
    settings = make_settings(training={"base_model": str(model_dir)}, data={"max_samples": 32})
    result = execute_run(settings, TrainParams(), "run_20250101_000000", stop=threading.Event())
    assert result.status.value == "completed", result.error
    assert not marker.exists()


def _complete_run(directory: Path, name: str) -> Path:
    run = directory / name
    run.mkdir(parents=True)
    for file in artifacts.REQUIRED_FILES:
        (run / file).write_text("{}")
    return run


def test_resume_from_resolves_only_inside_the_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    inside = _complete_run(out, "run_20250101_000000")
    outside = _complete_run(tmp_path / "elsewhere", "run_20250102_000000")
    assert artifacts.resolve_run_dir(out, "run_20250101_000000") == inside.resolve()
    # A run directory that is a symlink to somewhere else is not followed.
    (out / "run_20250102_000000").symlink_to(outside)
    with pytest.raises(ArtifactError, match="not inside"):
        artifacts.resolve_run_dir(out, "run_20250102_000000")
    # `latest` pointing outside (absolute, or climbing out) never resolves to anything outside.
    for target in (str(outside), "../elsewhere/run_20250102_000000", "/etc"):
        link = out / "latest"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        with pytest.raises(ArtifactError):
            artifacts.resolve_run_dir(out, "latest")
    for reference in (
        "../elsewhere/run_20250102_000000",
        str(outside),
        "run_20250101_000000/..",
        "..",
        "/etc",
        "file:///etc/passwd",
        "run_20250101_000000/../../elsewhere/run_20250102_000000",
    ):
        with pytest.raises(ArtifactError):
            artifacts.resolve_run_dir(out, reference)


def test_base_model_only_from_the_allow_list(make_settings: SettingsFactory, tiny_model: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    app = TrainerApp(make_settings(), launcher=RefusingLauncher())
    app.start(connect=False)
    try:
        for candidate in (
            str(other),
            f"{tiny_model}/",
            f"{tiny_model}/../{tiny_model.name}",
            "gpt2",
            "https://huggingface.co/gpt2",
            "file://" + str(tiny_model),
            "../../etc/passwd",
        ):
            response = json.loads(app.handle_command(json.dumps(
                {"action": "start", "request_id": "r", "params": {"base_model": candidate}}).replace('"r"', f'"{abs(hash(candidate))}"').encode()))  # fmt: skip  # noqa: E501
            assert response["error"]["code"] == "base_model_not_allowed", (candidate, response)
        assert app.runner.active is None and app.store.recent(5) == []
    finally:
        app.stop()
