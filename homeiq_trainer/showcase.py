"""`homeiq-trainer demo`: the whole product end to end on a fresh machine, nothing else to set up.

A private Mosquitto on a free port, a HomeIQ-shaped database, a locally built model, the daemon,
and a press of the Start button exactly as Home Assistant sends it; then live progress, where the
adapter is, and a sample of what it generates.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_LOGGER = logging.getLogger(__name__)

DEMO_ROWS = 400
BROKER_START_TIMEOUT_S = 10.0
DAEMON_ONLINE_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 900.0
SAMPLE_QUERIES = ("Turn on the porch light at sunset", "Lock the garage door lock when I leave home")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_mosquitto() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise SystemExit("error: mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
    return found


def _start_broker(directory: Path, port: int) -> subprocess.Popen[bytes]:
    config = directory / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    config.write_text(f"{user}persistence false\nlistener {port} 127.0.0.1\nallow_anonymous true\n")
    log = (directory / "mosquitto.log").open("wb")
    proc = subprocess.Popen([_find_mosquitto(), "-c", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                detail = (directory / "mosquitto.log").read_text(errors="replace")[-500:]
                raise SystemExit(f"error: mosquitto exited: {detail}") from None
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("error: mosquitto did not start")


def prepare(directory: Path) -> tuple[Path, Path]:
    """The demo database and model (built once, reused after)."""
    from homeiq_trainer.demo import build_tiny_model, create_source_db

    directory.mkdir(parents=True, exist_ok=True)
    # Each is built aside and renamed into place: an interrupted build is never taken for a finished one.
    source = directory / "ai_automation.db"
    if not source.exists():
        partial = directory / "ai_automation.db.partial"
        partial.unlink(missing_ok=True)
        create_source_db(partial, rows=DEMO_ROWS)
        partial.replace(source)
        _LOGGER.info("Created a HomeIQ-shaped demo database: %s (%d rows)", source, DEMO_ROWS)
    model = directory / "model"
    if not model.exists():
        partial = directory / "model.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build_tiny_model(partial, d_model=128, d_ff=256, num_layers=2, vocab_size=600)
        partial.replace(model)
        _LOGGER.info("Built a small demo T5 in %s (the Hugging Face Hub is not needed)", model)
    return source, model


def _environment(directory: Path, source: Path, model: Path, epochs: int, port: int | None) -> dict[str, str]:
    # The demo's own settings only: a developer's HOMEIQ_* or an add-on token must not leak in.
    inherited = {k: v for k, v in os.environ.items() if not k.upper().startswith("HOMEIQ_") and k != "SUPERVISOR_TOKEN"}
    env = {
        **inherited,
        "HOMEIQ_DATA__SOURCE_DB": str(source),
        "HOMEIQ_STORAGE__OUTPUT_DIR": str(directory / "ask_ai_soft_prompt"),
        "HOMEIQ_STORAGE__HISTORY_DB": str(directory / "homeiq_trainer.db"),
        "HOMEIQ_TRAINING__BASE_MODEL": str(model),
        "HOMEIQ_TRAINING__EPOCHS": str(epochs),
        # The demo model starts from random weights: a higher rate and every projection adapted let
        # it learn the demo data's phrasing within a minute.
        "HOMEIQ_TRAINING__LEARNING_RATE": "0.005",
        "HOMEIQ_LORA__TARGET_MODULES": '["q", "k", "v", "o", "wi_0", "wi_1", "wo"]',
        "HOMEIQ_LORA__R": "32",
        # A random model rarely ends its answers: keep the before/after comparison to a minute.
        "HOMEIQ_EVALUATION__MAX_GENERATE_EXAMPLES": "20",
        "HOMEIQ_EVALUATION__MAX_NEW_TOKENS": "32",
        "HF_HUB_OFFLINE": "1",
    }
    if port is not None:
        env.update(
            {
                "HOMEIQ_MQTT__HOST": "127.0.0.1",
                "HOMEIQ_MQTT__PORT": str(port),
                "HOMEIQ_MQTT__CLIENT_ID": "homeiq-trainer-demo",
                "HOMEIQ_DAEMON__ANNOUNCE_DELAY_MAX_S": "0",
            }
        )
    return env


def _press_start_and_follow(port: int, base: str, daemon_alive: Callable[[], bool]) -> dict[str, Any]:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    latest: dict[str, Any] = {}
    changed = threading.Condition()

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with changed:
            try:
                latest[msg.topic] = json.loads(msg.payload) if msg.payload[:1] in (b"{", b"[") else msg.payload.decode()
            except ValueError:
                return
            changed.notify_all()

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="homeiq-demo-user")
    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe([(f"{base}/#", 1), ("homeassistant/device/+/config", 1)])
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        online_deadline = time.monotonic() + DAEMON_ONLINE_TIMEOUT_S
        while True:
            with changed:  # woken by a message, or each 0.5 s to notice a daemon that exited
                if changed.wait_for(lambda: latest.get(f"{base}/availability") == "online", 0.5):
                    break
            if not daemon_alive():
                raise SystemExit("error: the daemon exited before coming online (its log is above)")
            if time.monotonic() > online_deadline:
                raise SystemExit("error: the daemon did not come online")
        discovery: dict[str, Any] = next((v for k, v in latest.items() if k.startswith("homeassistant/device/")), {})
        entities = ", ".join(c["name"] for c in discovery.get("components", {}).values() if "name" in c)
        print(f"daemon online; Home Assistant would discover: {entities}")
        print(f"pressing Start: publish 'start' to {base}/command (what the HA button sends)")
        client.publish(f"{base}/command", "start", qos=1).wait_for_publish(5)
        with changed:  # the run this start made: a second demo sees the last one's retained state first
            if not changed.wait_for(lambda: f"{base}/response" in latest, DAEMON_ONLINE_TIMEOUT_S):
                raise SystemExit("error: the daemon did not answer the start")
            response = dict(latest[f"{base}/response"])
        if response.get("status") != "ok":
            raise SystemExit(f"error: the daemon refused the start: {(response.get('error') or {}).get('message')}")
        run_id = (response.get("data") or {}).get("run_id")
        last_shown: tuple[Any, ...] = ()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            with changed:
                changed.wait(1.0)
                state = dict(latest.get(f"{base}/state") or {})
                progress = dict(latest.get(f"{base}/progress") or {})
            if not daemon_alive():
                raise SystemExit("error: the daemon exited during the run (its log is above)")
            if state.get("state") in ("completed", "failed", "cancelled") and state.get("run_id") == run_id:
                print(f"\nstate: {state['state']} ({state.get('message', '')})")
                with changed:
                    return dict(latest)
            loss = progress.get("loss")
            line = (
                f"state {state.get('state', '?'):<9} phase {state.get('phase') or '-':<13} "
                f"{progress.get('percent', 0):5.1f}%  step {progress.get('step', 0)}/{progress.get('total_steps', 0)}"
            )
            if isinstance(loss, int | float):
                line += f"  loss {loss:.3f}"
            # A line per phase and per 5% of progress, not per message.
            shown = (state.get("state"), state.get("phase"), int(progress.get("percent", 0) // 5))
            if shown != last_shown:
                print(line, flush=True)
                last_shown = shown
        raise SystemExit("error: the run did not finish in time")
    finally:
        client.loop_stop()
        client.disconnect()


def _sample(adapter: Path, model: Path) -> None:
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not for users
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    generator = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model), str(adapter))
    generator.eval()
    for query in SAMPLE_QUERIES:
        ids = tokenizer(query, return_tensors="pt")
        output = generator.generate(**ids, max_new_tokens=40, num_beams=2, do_sample=False, no_repeat_ngram_size=3)
        print(f"  {query!r}\n    → {tokenizer.decode(output[0], skip_special_tokens=True)!r}")


def run_demo(directory: Path, daemon: bool = True, epochs: int = 6) -> int:
    """Build what the demo needs and run it; returns the exit code."""
    directory = directory.resolve()
    source, model = prepare(directory)
    output_dir = directory / "ask_ai_soft_prompt"
    if not daemon:
        env = _environment(directory, source, model, epochs, None)
        code = subprocess.call([sys.executable, "-m", "homeiq_trainer", "train", "--triggered-by", "demo"], env=env)
        if code != 0:
            return code
    else:
        port = _free_port()
        broker = _start_broker(directory, port)
        env = _environment(directory, source, model, epochs, port)
        print(f"mosquitto listening on 127.0.0.1:{port}; starting `homeiq-trainer serve`")
        serve = subprocess.Popen([sys.executable, "-m", "homeiq_trainer", "serve"], env=env)
        try:
            final = _press_start_and_follow(port, "homeiq/trainer", lambda: serve.poll() is None)
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve.kill()
            broker.terminate()
            broker.wait(timeout=10)
        if final.get("homeiq/trainer/state", {}).get("state") != "completed":
            print(f"error: {final.get('homeiq/trainer/last_run', {}).get('error')}", file=sys.stderr)
            return 1
        last = final.get("homeiq/trainer/last_run", {})
        print(
            f"final loss {last.get('final_loss'):.4f}, eval loss {last.get('eval_loss'):.4f}, "
            f"{last.get('dataset_size')} examples"
        )
    latest = output_dir / "latest"
    print(f"\nadapter: {latest} -> {os.readlink(latest)}")
    for item in sorted((output_dir / os.readlink(latest)).iterdir()):
        print(f"  {item.name}")
    subprocess.call([sys.executable, "-m", "homeiq_trainer", "runs", "--limit", "5"], env=env)
    print("\nwhat the adapter generates (a tiny demo model trained for a minute, so expect rough text):")
    _sample(latest, model)
    return 0
