"""The command line: `homeiq-trainer train | runs | promote | rollback | generate | serve | discovery | demo`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from homeiq_trainer import __version__
from homeiq_trainer.history import HistoryUnavailable
from homeiq_trainer.jobs import InstanceBusy
from homeiq_trainer.messages import Phase, ProgressEvent, RunStatus, TrainParams
from homeiq_trainer.parameters import PARAMETERS, parameter
from homeiq_trainer.settings import ConfigError, Settings, load_settings

_LOGGER = logging.getLogger("homeiq_trainer")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130
# Plain progress lines when stdout is not a terminal: at most one per this many seconds.
LOG_PROGRESS_EVERY_S = 5.0
WORKER_COMMAND = "_worker"  # the training process the daemon starts (runner.WORKER_COMMAND); not for users


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Third-party chatter (weight loading bars, HTTP) is not ours to show.
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    from homeiq_trainer.addon import AddonError, addon_settings_source

    try:
        addon_options = addon_settings_source()
    except AddonError as exc:
        raise ConfigError(str(exc)) from None
    return load_settings(args.config, overrides, addon_options=addon_options)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _demo_epochs(text: str) -> int:
    value = _positive_int(text)
    highest = parameter("epochs").le
    if highest is not None and value > highest:
        raise argparse.ArgumentTypeError(f"must be at most {highest:g}, got {value}")
    return value


def _section_overrides(pairs: dict[str, tuple[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, dict[str, Any]] = {}
    for attr, (section, key) in pairs.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    return overrides


class ConsoleObserver:
    """A rich progress bar on a terminal, plain log lines elsewhere."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self._progress: Any = None
        self._task: Any = None
        self._bar_phase: Phase | None = None
        self._last_log = 0.0

    def phase(self, phase: Phase, message: str = "") -> None:
        if phase is not Phase.TRAINING:
            self.close()
        _LOGGER.info("%s: %s", phase.value.replace("_", " "), message)

    def progress(self, event: ProgressEvent) -> None:
        loss = f"{event.loss:.4f}" if event.loss is not None else "-"
        if self.interactive:
            if self._bar_phase is not event.phase:  # the final scoring counts its own steps: a bar of its own
                self.close()
            if self._progress is None:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self._progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"),
                    TextColumn("{task.fields[rate]}"),
                    TimeRemainingColumn(),
                    transient=False,
                )
                self._progress.start()
                self._task = self._progress.add_task(event.phase.value, total=event.total_steps, loss="-", rate="")
                self._bar_phase = event.phase
            rate = f"{event.samples_per_s:.1f} samples/s" if event.samples_per_s else ""
            self._progress.update(self._task, completed=event.step, loss=loss, rate=rate)
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_PROGRESS_EVERY_S or event.step == event.total_steps:
            self._last_log = now
            if event.phase is Phase.EVALUATING:
                _LOGGER.info("scoring step %d/%d (%.0f%%)", event.step, event.total_steps, event.percent)
                return
            _LOGGER.info(
                "step %d/%d (%.0f%%) epoch %.2f loss %s eta %ss",
                event.step,
                event.total_steps,
                event.percent,
                event.epoch,
                loss,
                f"{event.eta_s:.0f}" if event.eta_s is not None else "?",
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._bar_phase = None


def cmd_train(args: argparse.Namespace) -> int:
    """Run one training run in the foreground."""
    from homeiq_trainer.control import SettingsPanel
    from homeiq_trainer.jobs import (
        InstanceLock,
        JobRequest,
        crash_result,
        open_history,
        open_run,
        recover,
    )
    from homeiq_trainer.overrides import OverridesStore, pinned_settings
    from homeiq_trainer.promotion import conclude
    from homeiq_trainer.training.run import execute_run

    overrides = _section_overrides(
        {
            "source": ("data", "source"),
            "source_db": ("data", "source_db"),
            "output_dir": ("storage", "output_dir"),
            "history_db": ("storage", "history_db"),
        },
        args,
    )
    # A URL (`data.source`, `storage.history`) wins over its `*_db` path, so a path given here clears
    # one set elsewhere: the run must read and record where this command says.
    if args.source_db is not None and args.source is None:
        overrides["data"]["source"] = ""
    if args.history_db is not None:
        overrides["storage"]["history"] = ""
    settings = _settings(args, overrides)
    _setup_logging(settings.log_level)
    params = TrainParams(
        **{declared.name: getattr(args, declared.name) for declared in PARAMETERS},
        resume_from=args.resume_from,
        base_model=args.base_model,
    )
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        _LOGGER.warning("Signal %d: stopping at the next step", signum)
        stop.set()

    # Before the row is opened, so that a Ctrl-C can never leave it `running`.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    lock = InstanceLock(settings)
    lock.acquire()
    try:
        store = open_history(settings)
        # Values set from Home Assistant apply here too; this command's own options win, as a command's params do.
        panel = SettingsPanel(settings, OverridesStore(store.engine), pinned_settings(os.environ, overrides))
        settings = panel.effective
        recover(store, settings)
        run = open_run(store, settings, JobRequest(params=params, triggered_by=args.triggered_by))
        store.mark_running(run.id)  # type: ignore[arg-type]
        _LOGGER.info("Run %s started (history row %s)", run.run_identifier, run.id)
        observer = ConsoleObserver(interactive=sys.stdout.isatty() and not args.no_progress)
        try:
            result = execute_run(settings, params, run.run_identifier, observer, stop)
        except Exception as exc:  # the outermost loop of this command: record, then report in one line
            _LOGGER.debug("Training raised", exc_info=True)
            result = crash_result(run, exc)
        finally:
            observer.close()
        run = conclude(store, settings, run, result)
        store.close()
    finally:
        lock.release()

    if result.status is RunStatus.COMPLETED:
        print(
            f"{run.run_identifier} completed: {result.data.examples} examples "
            f"({result.train_examples} train / {result.eval_examples} eval), "
            f"final loss {_fmt(result.final_loss)}, eval loss {_fmt(result.eval_loss)}, "
            f"adapter {result.run_dir}; {'served' if run.promoted else 'not served'} ({run.decision_reason})"
        )
        return EXIT_OK
    if result.status is RunStatus.CANCELLED:
        print(f"{run.run_identifier} cancelled; latest adapter unchanged", file=sys.stderr)
        return EXIT_CANCELLED
    print(f"error: {run.run_identifier} failed: {result.reason()}", file=sys.stderr)
    return EXIT_FAILED


def _short_time(iso: str | None) -> str:
    return iso[:16].replace("T", " ") if iso else "-"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_runs(args: argparse.Namespace) -> int:
    """List the history, newest first."""
    from homeiq_trainer.database import masked, sqlite_path
    from homeiq_trainer.history import HistoryStore, run_to_dict

    settings = _settings(args)
    history = settings.storage.history_url()
    path = sqlite_path(history)
    if path is not None and not path.exists():
        rows: list[dict[str, Any]] = []
    else:
        store = HistoryStore(history)
        rows = [run_to_dict(run) for run in store.recent(args.limit)]
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no runs yet")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"training runs ({masked(history)})")
    for column in ("id", "run", "status", "samples", "loss", "started", "finished"):
        table.add_column(column, no_wrap=True)
    table.add_column("note", overflow="fold")
    for row in rows:
        note = (row["error"] or "").strip().splitlines()
        cells = (
            str(row["id"]),
            row["run_id"],
            row["status"],
            str(row["dataset_size"] or "-"),
            _fmt(row["final_loss"]),
            _short_time(row["started_at"]),
            _short_time(row["finished_at"]),
            (note[-1][:80] if note else f"by {row['triggered_by']}"),
        )
        # Plain text: an error or a --triggered-by holding "[/x]" is no markup (it ended `runs` in a traceback).
        table.add_row(*(Text(cell or "") for cell in cells))
    Console(width=max(120, Console().width)).print(table)
    return EXIT_OK


def cmd_serving(args: argparse.Namespace) -> int:
    """`promote RUN` or `rollback`: switch the served adapter (with the daemon stopped; else use MQTT)."""
    from homeiq_trainer import promotion
    from homeiq_trainer.jobs import InstanceLock, open_history

    settings = _settings(args)
    _setup_logging(settings.log_level)
    lock = InstanceLock(settings)
    lock.acquire()
    try:
        store = open_history(settings)  # `storage.history` where set, as `serve` and `train` do
        try:
            promotion.reconcile(store, settings.storage.output_dir)
            if args.command == "promote":
                served = promotion.promote(store, settings, args.run_id, triggered_by="cli").run_identifier
            else:
                served = promotion.rollback(store, settings, triggered_by="cli")
        finally:
            store.close()
    except promotion.PromotionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        lock.release()
    print(f"serving {served} from {settings.storage.output_dir / served}")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    """Print what an adapter (default: the served one) answers to a query."""
    from homeiq_trainer.training import artifacts
    from homeiq_trainer.training.evaluate import answer

    settings = _settings(args)
    _setup_logging("WARNING")
    try:
        run_dir = artifacts.resolve_run_dir(settings.storage.output_dir, args.run or artifacts.LATEST, "--run")
    except artifacts.ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    from homeiq_trainer.training.engine import RunInputError

    try:
        said = answer(run_dir, args.query, settings.training.source_max_tokens, settings.evaluation.max_new_tokens)
    except RunInputError as exc:  # the adapter's base model cannot be loaded here
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(said)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the MQTT daemon until SIGTERM/SIGINT."""
    from homeiq_trainer.app import serve

    _setup_logging("INFO")  # what loading the settings says (the add-on's broker from the Supervisor)
    settings = _settings(args)
    _setup_logging(settings.log_level)
    return serve(settings)


def cmd_worker(args: argparse.Namespace) -> int:
    """Internal: the training child process the daemon supervises."""
    from homeiq_trainer.worker import main as worker_main

    return worker_main(args.event_fd)


def cmd_discovery(args: argparse.Namespace) -> int:
    """Print or remove the Home Assistant discovery and retained state topics."""
    from homeiq_trainer.app import remove_retained, show_discovery

    settings = _settings(args)
    _setup_logging(settings.log_level)
    if args.remove:
        return remove_retained(settings)
    return show_discovery(settings)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo database and model, then run the whole thing end to end."""
    from homeiq_trainer.showcase import run_demo

    _setup_logging("INFO")
    return run_demo(Path(args.directory), daemon=not args.train_only, epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(prog="homeiq-trainer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, help="TOML file (default: $HOMEIQ_CONFIG, else built-in defaults)")
        return p

    train = with_config(sub.add_parser("train", help="run one training run in the foreground"))
    for declared in PARAMETERS:
        train.add_argument(
            f"--{declared.name.replace('_', '-')}",
            type=declared.kind,
            help=f"{declared.help} ({declared.bounds_text()}; default: {declared.section}.{declared.key})",
        )
    train.add_argument("--base-model", help="hub id or local directory of a seq2seq model")
    train.add_argument("--resume-from", help="'latest' or a run identifier from the history")
    train.add_argument(
        "--source",
        help="HomeIQ's database as a URL (postgresql://user@host:5432/homeiq) or SQLite path, read-only; "
        "give a password in HOMEIQ_DATA__SOURCE_PASSWORD, not here (a command line is visible to all)",
    )
    train.add_argument("--source-db", type=Path, help="HomeIQ's SQLite database (read-only)")
    train.add_argument("--output-dir", type=Path)
    train.add_argument("--history-db", type=Path)
    train.add_argument("--triggered-by", default="cli", help="recorded in the history (default: cli)")
    train.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    train.set_defaults(func=cmd_train)

    runs = with_config(sub.add_parser("runs", help="list the run history, newest first"))
    runs.add_argument("--limit", type=_positive_int, default=25, help="at most this many runs (default: 25)")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.set_defaults(func=cmd_runs)

    promote = with_config(sub.add_parser("promote", help="serve a completed run's adapter (points latest at it)"))
    promote.add_argument("run_id", help="a run identifier from `runs`")
    promote.set_defaults(func=cmd_serving)
    rollback = with_config(sub.add_parser("rollback", help="serve the adapter served before the current one"))
    rollback.set_defaults(func=cmd_serving)

    generate = with_config(sub.add_parser("generate", help="print what an adapter answers to a query"))
    generate.add_argument("query", help="an Ask AI query")
    generate.add_argument("--run", help="a run identifier (default: the served adapter, `latest`)")
    generate.set_defaults(func=cmd_generate)

    serve = with_config(sub.add_parser("serve", help="run the MQTT daemon"))
    serve.set_defaults(func=cmd_serve)

    discovery = with_config(sub.add_parser("discovery", help="show or remove Home Assistant discovery"))
    discovery.add_argument("--remove", action="store_true", help="clear retained discovery and state topics")
    discovery.set_defaults(func=cmd_discovery)

    demo = sub.add_parser("demo", help="end-to-end demo with a local broker, demo data and a tiny model")
    demo.add_argument("--directory", default="demo", help="where the demo keeps its files (default: ./demo)")
    demo.add_argument("--epochs", type=_demo_epochs, default=6, help="passes over the demo data (default: 6)")
    demo.add_argument("--train-only", action="store_true", help="no broker or daemon, only `train`")
    demo.set_defaults(func=cmd_demo)
    return parser


def _worker_parser() -> argparse.ArgumentParser:
    """The internal `_worker` command's own parser: kept out of the public one, so that neither its
    usage line nor an invalid-choice error lists it."""
    worker = argparse.ArgumentParser(prog="homeiq-trainer _worker")
    worker.add_argument("--event-fd", type=int, required=True)
    worker.set_defaults(func=cmd_worker)
    return worker


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    given = sys.argv[1:] if argv is None else argv
    internal = given[:1] == [WORKER_COMMAND]
    args = _worker_parser().parse_args(given[1:]) if internal else build_parser().parse_args(given)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InstanceBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HistoryUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # an unwritable history or output folder, before any run could record it
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:  # pydantic's ValidationError for bad CLI values
        from pydantic import ValidationError

        from homeiq_trainer.settings import describe_validation_error

        if isinstance(exc, ValidationError):
            print(f"error: {describe_validation_error(exc, 'invalid argument')}", file=sys.stderr)
            return EXIT_USAGE
        raise
    except KeyboardInterrupt:
        return EXIT_CANCELLED
