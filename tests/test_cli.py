"""The command line as a user runs it: a subprocess, exit codes, one-line reasons."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import SettingsFactory


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "homeiq_trainer", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def env_of(settings) -> dict[str, str]:
    return {
        "HOMEIQ_DATA__SOURCE_DB": str(settings.data.source_db),
        "HOMEIQ_STORAGE__OUTPUT_DIR": str(settings.storage.output_dir),
        "HOMEIQ_STORAGE__HISTORY_DB": str(settings.storage.history_db),
        "HOMEIQ_TRAINING__BASE_MODEL": settings.training.base_model,
        "HOMEIQ_TRAINING__LEARNING_RATE": "0.01",
    }


def test_train_then_runs(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings()
    source_hash = hashlib.sha256(settings.data.source_db.read_bytes()).hexdigest()
    done = cli("train", "--epochs", "1", "--max-samples", "60", env=env_of(settings))
    assert done.returncode == 0, done.stderr
    assert "completed: 60 examples (" in done.stdout and "; served (promoted: no adapter was in use)" in done.stdout
    assert "step " in done.stderr  # plain progress lines when not on a terminal
    assert "Warning" not in done.stderr  # no library's deprecation notes in a user's terminal
    assert hashlib.sha256(settings.data.source_db.read_bytes()).hexdigest() == source_hash

    listed = cli("runs", "--json", env=env_of(settings))
    assert listed.returncode == 0
    rows = json.loads(listed.stdout)
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["dataset_size"] == 60
    assert rows[0]["triggered_by"] == "cli"
    table = cli("runs", env=env_of(settings))
    assert rows[0]["run_id"] in table.stdout and "completed" in table.stdout


def test_promote_rollback_and_generate(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    env = env_of(settings) | {"HOMEIQ_PROMOTION__POLICY": "always", "HOMEIQ_EVALUATION__MAX_NEW_TOKENS": "8"}
    # A history given as a URL wins over history_db, for every command (promote and rollback once did not).
    env["HOMEIQ_STORAGE__HISTORY"] = f"sqlite:///{settings.storage.history_db.with_name('by-url.db')}"
    for _ in range(2):
        assert cli("train", "--epochs", "1", "--max-samples", "40", env=env).returncode == 0
    first, second = sorted(row["run_id"] for row in json.loads(cli("runs", "--json", env=env).stdout))
    out = settings.storage.output_dir
    assert os.readlink(out / "latest") == second
    back = cli("rollback", env=env)
    assert back.returncode == 0 and f"serving {first}" in back.stdout and os.readlink(out / "latest") == first
    again = cli("rollback", env=env)
    assert again.returncode == 1 and "no adapter was served before" in again.stderr
    assert cli("promote", second, env=env).returncode == 0 and os.readlink(out / "latest") == second
    unknown = cli("promote", "run_20990101_000000", env=env)
    assert unknown.returncode == 1 and "no run run_20990101_000000" in unknown.stderr
    said = cli("generate", "Turn on the porch light at sunset", "--run", first, env=env)
    assert said.returncode == 0 and said.stdout.endswith("\n"), said.stderr
    assert "Warning" not in said.stderr
    assert cli("generate", "x", "--run", "run_20990101_000000", env=env).returncode == 1
    assert not settings.storage.history_db.exists()


def test_failures_exit_non_zero_with_one_line(make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings()
    missing = cli("train", env=env_of(settings) | {"HOMEIQ_DATA__SOURCE_DB": str(tmp_path / "nope.db")})
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("error: run_")
    assert "source database not found" in missing.stderr and "Traceback" not in missing.stderr

    bad = cli("train", "--epochs", "0", env=env_of(settings))
    assert bad.returncode == 2 and "epochs" in bad.stderr and "Traceback" not in bad.stderr
    for epochs in ("0", "101"):  # before: the demo's daemon refused it, and the demo waited 30 s, exit 1
        demo = cli("demo", "--epochs", epochs, "--directory", str(tmp_path / "demo"), env=env_of(settings))
        assert demo.returncode == 2 and "--epochs" in demo.stderr and not (tmp_path / "demo").exists()

    config = tmp_path / "c.toml"
    config.write_text("[training]\nepoch = 1\n")
    unknown = cli("train", "--config", str(config), env=env_of(settings))
    assert unknown.returncode == 2 and "training.epoch" in unknown.stderr

    listed = json.loads(cli("runs", "--json", env=env_of(settings)).stdout)
    assert [r["status"] for r in listed] == ["failed"]  # bad arguments never opened a run

    # A path in the error that reads as rich markup ended `runs` in a MarkupError traceback.
    missing_db = f"/tmp/[/gone-{os.getpid()}].db"  # short: the note shows the error's first 80 characters
    odd = cli("train", env=env_of(settings) | {"HOMEIQ_DATA__SOURCE_DB": missing_db})
    assert odd.returncode == 1 and not Path(missing_db).exists()
    table = cli("runs", env=env_of(settings))
    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    assert f"[/gone-{os.getpid()}]" in table.stdout


def test_demo_runs_the_daemon_end_to_end(tmp_path: Path) -> None:
    # The README's "run the main job" command, shortened to one epoch.
    done = cli("demo", "--directory", str(tmp_path / "demo"), "--epochs", "1", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "pressing Start" in done.stdout and "state: completed" in done.stdout
    assert "what the adapter generates" in done.stdout
    latest = tmp_path / "demo" / "ask_ai_soft_prompt" / "latest"
    assert (latest / "adapter_model.safetensors").is_file()
    first = os.readlink(latest)
    # Again in the same folder: the daemon comes up with the first run's retained `completed` state,
    # which the demo must not take for the end of the run it starts.
    again = cli("demo", "--directory", str(tmp_path / "demo"), "--epochs", "1", timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    history = {"HOMEIQ_STORAGE__HISTORY_DB": str(tmp_path / "demo" / "homeiq_trainer.db")}
    runs = json.loads(cli("runs", "--json", env=history).stdout)
    assert [run["status"] for run in runs] == ["completed", "completed"]  # the second was not cut short
    served = runs[0]["run_id"] if runs[0]["promoted"] else first  # the newest run, where the gate chose it
    assert os.readlink(latest) == served


def test_train_refuses_while_the_daemon_owns_the_history(make_settings: SettingsFactory) -> None:
    from homeiq_trainer.app import TrainerApp

    settings = make_settings()
    daemon = TrainerApp(settings)
    daemon.start(connect=False)  # holds the instance lock until stopped
    try:
        refused = cli("train", env=env_of(settings))
        assert refused.returncode == 2 and "another homeiq-trainer" in refused.stderr
        assert daemon.store.recent(5) == []  # nothing opened, nothing marked interrupted
    finally:
        daemon.stop()
    assert cli("train", "--max-samples", "30", env=env_of(settings)).returncode == 0


def test_train_uses_values_set_from_home_assistant_below_its_options_and_the_environment(
    make_settings: SettingsFactory,
) -> None:
    from homeiq_trainer.history import HistoryStore
    from homeiq_trainer.overrides import OverridesStore

    settings = make_settings()
    history = HistoryStore(settings.storage.history_db)
    stored = {"training.epochs": 2, "data.max_samples": 40, "training.learning_rate": 0.0001}
    for key, value in stored.items():
        OverridesStore(history.engine).set(key, value)
    history.close()
    done = cli("train", "--max-samples", "30", env=env_of(settings))
    assert done.returncode == 0, done.stderr
    history = HistoryStore(settings.storage.history_db)
    params = history.recent(1)[0].parameters_json or {}
    history.close()
    # Home Assistant's epochs; the option's max_samples; the environment's (pinned) learning rate.
    assert (params["epochs"], params["max_samples"], params["learning_rate"]) == (2, 30, 0.01)


def test_serve_refuses_tls_options_without_tls(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    done = cli("serve", env=env_of(settings) | {"HOMEIQ_MQTT__CA_CERTS": "/etc/ssl/ca.pem"}, timeout=60)
    assert done.returncode == 2 and "ca_certs set but tls is false" in done.stderr


def test_a_broken_history_and_bad_options_get_one_line(make_settings: SettingsFactory, tmp_path: Path) -> None:
    env = env_of(make_settings())
    junk = tmp_path / "junk.db"
    junk.write_text("this is no database\n" * 200)
    for command in (["runs"], ["promote", "run_20250101_000000"], ["rollback"], ["train"], ["serve"]):
        done = cli(*command, env=env | {"HOMEIQ_STORAGE__HISTORY_DB": str(junk)})
        assert done.returncode == 1, (command, done.stderr)
        assert f"cannot open the history at {junk}" in done.stderr and "Traceback" not in done.stderr, command
    # A server that is not there: one line, the password masked.
    down = cli("runs", env=env | {"HOMEIQ_STORAGE__HISTORY": "postgresql://trainer:s3cret@127.0.0.1:1/history"})
    assert down.returncode == 1 and "cannot open the history at" in down.stderr
    assert "s3cret" not in down.stderr and "Traceback" not in down.stderr

    assert cli("runs", "--limit", "0", env=env).returncode == 2
    unserved = cli("generate", "hi", env=env)
    assert unserved.returncode == 1 and "no adapter is served" in unserved.stderr
    named = cli("generate", "hi", "--run", "foo", env=env)
    assert named.returncode == 1 and "--run must be" in named.stderr and "resume_from" not in named.stderr


def test_path_options_win_over_urls_set_elsewhere(make_settings: SettingsFactory, tmp_path: Path) -> None:
    """`--history-db` and `--source-db` were ignored where the environment set `storage.history` or `data.source`."""
    elsewhere = tmp_path / "elsewhere.db"
    env = env_of(make_settings()) | {
        "HOMEIQ_STORAGE__HISTORY": f"sqlite:///{elsewhere}",
        "HOMEIQ_DATA__SOURCE": "postgresql://homeiq@127.0.0.1:1/homeiq",
    }
    named = tmp_path / "named.db"
    done = cli("train", "--history-db", str(named), "--source-db", str(tmp_path / "missing.db"), env=env)
    assert done.returncode == 1 and f"source database not found: {tmp_path / 'missing.db'}" in done.stderr
    assert named.exists() and not elsewhere.exists()


def test_help_lists_every_user_command_and_hides_the_internal_one() -> None:
    shown = cli("--help")
    assert shown.returncode == 0
    for command in ("train", "runs", "promote", "rollback", "generate", "serve", "discovery", "demo"):
        assert f"\n    {command}" in shown.stdout, command
    assert "_worker" not in shown.stdout and "SUPPRESS" not in shown.stdout
    # argparse's invalid-choice error lists every command it knows.
    typo = cli("trian")
    assert typo.returncode == 2 and "'train'" in typo.stderr and "_worker" not in typo.stderr


def test_the_demo_follows_the_run_its_start_made_not_the_last_ones_state(broker, watcher) -> None:
    """A stand-in daemon that answers the start before its state moves off the last run's `completed`."""
    import threading

    from homeiq_trainer.showcase import DAEMON_ONLINE_TIMEOUT_S, _press_start_and_follow

    base = "demo/trainer"
    watcher.publish(f"{base}/availability", "online", retain=True)
    old = {"state": "completed", "run_id": "run_old", "message": "the last run"}
    watcher.publish(f"{base}/state", json.dumps(old), retain=True)

    def stand_in_daemon() -> None:
        for n in (1, 2):  # answers each start; only the first run ever moves
            while len(watcher.messages(f"{base}/command")) < n:
                time.sleep(0.02)
            data = {"run_id": f"run_new{n}", "state": "queued"}
            watcher.publish(f"{base}/response", json.dumps({"action": "start", "status": "ok", "data": data}))
            if n == 1:
                time.sleep(1.5)  # past the demo's first wait
                for state in ("queued", "running", "completed"):
                    watcher.publish(f"{base}/state", json.dumps({"state": state, "run_id": "run_new1"}), retain=True)

    threading.Thread(target=stand_in_daemon, daemon=True).start()
    final = _press_start_and_follow(broker.port, base, lambda: True)
    assert final[f"{base}/state"]["run_id"] == "run_new1"  # before: the demo ended on run_old's state
    with pytest.raises(SystemExit, match="the daemon exited during the run"):
        _press_start_and_follow(broker.port, base, lambda: False)  # before: waited out 15 minutes
    started = time.monotonic()
    with pytest.raises(SystemExit, match="the daemon exited before coming online"):
        _press_start_and_follow(broker.port, "demo/never-online", lambda: False)  # before: waited 30 s
    assert time.monotonic() - started < DAEMON_ONLINE_TIMEOUT_S
