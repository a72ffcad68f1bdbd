"""The single worker: accepts or rejects a job, owns its whole lifecycle, turns events into state.

Knows nothing about MQTT: whatever it has to say goes to a `RunnerListener` (the daemon's is the
`RunReporter`, reporter.py). A `Launcher` starts the training process (a child process here; another
backend plugs in as another launcher); the row stays `queued` until that process exists.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from homeiq_trainer.history import HISTORY_TIMEOUT_S, HistoryStore, TrainingRun
from homeiq_trainer.jobs import JobRequest, crash_result, open_run
from homeiq_trainer.messages import (
    Decision,
    Phase,
    PhaseEvent,
    ProgressEvent,
    RunResult,
    RunStatus,
    first_line,
    known,
)
from homeiq_trainer.promotion import conclude
from homeiq_trainer.settings import REVEAL_SECRETS, Settings
from homeiq_trainer.training import artifacts

_LOGGER = logging.getLogger(__name__)

STDERR_TAIL_LINES = 60
JOIN_TIMEOUT_S = 5.0
# How often the worker wakes while the training process is quiet, to check its deadlines.
TICK_S = 1.0
# While training, progress goes out at least this often even when a step takes longer.
PROGRESS_HEARTBEAT_S = 5.0
# A run's end that the history refused (a PostgreSQL restarting, a full disk) is tried again after
# these pauses, then before the next run starts and at shutdown; the row stays open meanwhile.
RECORD_RETRY_DELAYS_S = (2.0, 5.0)
# One event line longer than this (ours are well under 64 KiB) is dropped, never buffered on.
MAX_EVENT_LINE_BYTES = 4 * 1024 * 1024


class Busy(Exception):
    """A run is already queued or running."""

    def __init__(self, run: TrainingRun) -> None:
        super().__init__(f"run {run.run_identifier} is {run.status}")
        self.run = run


class NotRunning(Exception):
    """There is nothing to cancel."""


class RunnerListener(Protocol):
    """Receives everything the runner has to say."""

    def run_state(self, run: TrainingRun, phase: Phase | None, message: str) -> None: ...

    def run_progress(self, run: TrainingRun, event: ProgressEvent) -> None: ...

    def run_finished(self, run: TrainingRun, result: RunResult) -> None: ...


class TrainingProcess(Protocol):
    """A started training run that reports events and can be stopped."""

    def events(self, stall_timeout_s: float) -> Iterator[PhaseEvent | ProgressEvent | RunResult | None]:
        """Events as they come; `None` ticks about every second while nothing arrives."""
        ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout_s: float) -> int | None: ...

    def failure_text(self) -> str: ...


class Launcher(Protocol):
    """Starts training processes."""

    def start(self, settings: Settings, request: JobRequest, run: TrainingRun) -> TrainingProcess: ...


SHUTDOWN_CANCEL_REASON = "cancelled because the daemon stopped"
WORKER_COMMAND = (sys.executable, "-m", "homeiq_trainer", "_worker")
# What the training process may inherit: what Python, torch, Hugging Face and the locale need. Anything
# else (the Supervisor's tokens, our MQTT password in any spelling) stays with the daemon; the child
# gets its settings on stdin.
CHILD_ENV_NAMES = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "VIRTUAL_ENV",
     "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
     "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
     "TOKENIZERS_PARALLELISM", "XDG_CACHE_HOME", "CUDA_VISIBLE_DEVICES"}
)  # fmt: skip
# RAY_: Ray Client reads its TLS set-up (RAY_USE_TLS, RAY_TLS_*) and Ray Train its knobs from the
# environment of the process that connects, which is the training process.
CHILD_ENV_PREFIXES = ("LC_", "PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "CUDA_", "NVIDIA_",
                      "OMP_", "MKL_", "OPENBLAS_", "KMP_", "RAY_")  # fmt: skip


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed part of `environ` that a training process gets."""
    return {
        key: value for key, value in environ.items() if key in CHILD_ENV_NAMES or key.startswith(CHILD_ENV_PREFIXES)
    }


class Stalled(Exception):
    """The training process said nothing for too long."""


class SubprocessTraining:
    """`homeiq-trainer _worker` as a child process, events on a private pipe."""

    def __init__(
        self, settings: Settings, request: JobRequest, run: TrainingRun, command: Sequence[str] = WORKER_COMMAND
    ) -> None:
        from homeiq_trainer.worker import PARENT_PID_ENV, job_payload

        env = child_environment(os.environ)
        env[PARENT_PID_ENV] = str(os.getpid())
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._pending = bytearray()
        self._skipping = False  # within a line over MAX_EVENT_LINE_BYTES, dropped up to its end
        self._killed = False  # killed by us, after it had stopped reporting
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [*command, "--event-fd", str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(write_fd,),
                env=env,
                text=True,
                encoding="utf-8",
                errors="replace",
                # Its own process group: a Ctrl-C in the daemon's terminal is the daemon's to handle.
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        # Raw and unbuffered: a buffered reader could hold lines that select() no longer sees.
        self._events_fd = read_fd
        try:
            # On the private stdin pipe, never in the environment: the Ray token in clear, as the child needs it.
            settings_dump = settings.model_dump(mode="json", exclude={"mqtt", "daemon"}, context={REVEAL_SECRETS: True})
            assert self.proc.stdin is not None
            self.proc.stdin.write(job_payload(settings_dump, request.params, run.run_identifier))
            self.proc.stdin.flush()
        except OSError:
            # It died at once; its exit code and stderr say why, through the usual path.
            _LOGGER.warning("The training process exited before it read its job")
        self._stderr_thread = threading.Thread(target=self._drain_stderr, name="train-stderr", daemon=True)
        self._stderr_thread.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr_tail.append(line.rstrip())
            _LOGGER.debug("[train] %s", line.rstrip())

    def events(self, stall_timeout_s: float) -> Iterator[PhaseEvent | ProgressEvent | RunResult | None]:
        from homeiq_trainer.worker import parse_event

        selector = selectors.DefaultSelector()
        selector.register(self._events_fd, selectors.EVENT_READ)
        last_heard = time.monotonic()
        try:
            while True:
                if not selector.select(timeout=TICK_S):
                    if self.proc.poll() is not None:
                        if selector.select(timeout=0):
                            continue  # what it wrote just before it exited (its result) is read first
                        # Gone, with nothing left to read: a process it forked may still hold the
                        # pipe open, so its end would never come.
                        return
                    if time.monotonic() - last_heard > stall_timeout_s:
                        raise Stalled(f"the training process said nothing for {stall_timeout_s:g} s")
                    yield None  # a tick, so the caller can enforce its deadlines
                    continue
                last_heard = time.monotonic()
                chunk = os.read(self._events_fd, 65536)
                if not chunk:
                    return
                for line in self._complete_lines(chunk):
                    try:
                        yield parse_event(line.decode("utf-8"))
                    except ValueError:
                        _LOGGER.warning("Ignoring a malformed event line from the training process")
        finally:
            selector.close()

    def _complete_lines(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` completes; the rest waits for the next. Linear in the bytes read."""
        head, newline, tail = chunk.rpartition(b"\n")
        if not newline:
            if not self._skipping:
                self._pending += chunk
                if len(self._pending) > MAX_EVENT_LINE_BYTES:
                    _LOGGER.warning(
                        "Dropping an event line over %d bytes from the training process", MAX_EVENT_LINE_BYTES
                    )
                    self._pending.clear()
                    self._skipping = True
            return []
        lines = (bytes(self._pending) + head).split(b"\n")
        self._pending = bytearray(tail)
        if self._skipping:  # the dropped line's end
            lines, self._skipping = lines[1:], False
        return lines

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self._killed = True
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL the child's whole process group (its own session): what it forked or started too."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout_s: float) -> int | None:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        # Whatever it left behind in its group (a forked data worker, a helper it started) goes with it,
        # and lets go of the pipes.
        self._kill_group()
        self._stderr_thread.join(timeout=JOIN_TIMEOUT_S)
        if self._events_fd >= 0:
            os.close(self._events_fd)
            self._events_fd = -1
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        return code

    def failure_text(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            why = f"the training process was killed by {name}"
            if self._killed:
                why = "the training process stopped reporting without a result and was killed"
            elif -code == signal.SIGKILL:
                why += " (out of memory, or killed from outside)"
        else:
            why = f"the training process exited with code {code} without a result"
        tail = "\n".join(self._stderr_tail)
        return f"{tail}\n{why}" if tail else why


class SubprocessLauncher:
    """Starts each run in its own child process (`command`: the worker's entry point, tests wrap it)."""

    def __init__(self, command: Sequence[str] = WORKER_COMMAND) -> None:
        self.command = tuple(command)

    def start(self, settings: Settings, request: JobRequest, run: TrainingRun) -> TrainingProcess:
        return SubprocessTraining(settings, request, run, self.command)


@dataclass
class ActiveJob:
    """The run the worker owns right now."""

    run: TrainingRun
    request: JobRequest
    settings: Settings
    """The settings this run trains with (the configured ones with Home Assistant's values applied)."""
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    process: TrainingProcess | None = None
    phase: Phase | None = None
    finishing: bool = False
    """Set (under the runner's lock) once the worker has read `cancel_requested` for the last time."""


class Runner:
    """Runs at most one job at a time in a named worker thread."""

    def __init__(
        self,
        settings: Settings,
        store: HistoryStore,
        listener: RunnerListener,
        launcher: Launcher | None = None,
        before_open: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.listener = listener
        self.launcher = launcher or SubprocessLauncher()
        self.before_open = before_open
        """Called before a run's row is opened (the instance lock's `ensure`); what it raises refuses the run."""
        self._lock = threading.Lock()
        self._active: ActiveJob | None = None
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = threading.Event()
        """Set by `shutdown`: a run's end the history refuses is not waited on, only tried again once."""
        self._unrecorded: list[tuple[TrainingRun, RunResult]] = []
        """Ended runs the history refused to record; tried again before the next run and at shutdown."""

    @property
    def active(self) -> ActiveJob | None:
        """The queued or running job, if any."""
        return self._active

    def submit(self, request: JobRequest, settings: Settings | None = None) -> TrainingRun:
        """Queue a run (with `settings`, else the runner's) and start it; raises `Busy` or `ShuttingDown`."""
        settings = settings or self.settings
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the daemon is shutting down")
            if self._active is not None:
                raise Busy(self._active.run)
            self._record_unrecorded()
            if self.before_open is not None:
                self.before_open()
            run = open_run(self.store, settings, request)
            job = ActiveJob(run=run, request=request, settings=settings)
            self._active = job
            self._thread = threading.Thread(target=self._work, args=(job,), name=f"run-{run.run_identifier}")
        self.listener.run_state(run, None, "queued")
        self._thread.start()
        return run

    def cancel(self) -> TrainingRun:
        """Ask the active run to stop at its next step; raises `NotRunning` when there is none."""
        with self._lock:
            job = self._active
            if job is None:
                raise NotRunning("no run is queued or running")
            if job.finishing:  # an `ok` now would promise a cancel nobody would carry out
                raise NotRunning(f"run {job.run.run_identifier} has ended and is being recorded")
            job.cancel_requested.set()
            if job.process is not None:
                job.process.terminate()
        _LOGGER.info("Cancelling run %s", job.run.run_identifier)
        return job.run

    def shutdown(self, timeout_s: float) -> None:
        """Stop accepting, cancel any active run and wait for it to end (it is killed after `timeout_s`)."""
        # A start holds the lock while it opens its run (bounded by the history's statement timeout),
        # and on a history server gone quiet for good: then the stop goes on without it.
        locked = self._lock.acquire(timeout=HISTORY_TIMEOUT_S + JOIN_TIMEOUT_S)
        self._accepting = False
        thread = self._thread
        if locked:
            self._lock.release()
        else:
            _LOGGER.error("A run's start is waiting on the history and does not end; stopping without it")
        self._stopping.set()
        if self._active is not None:
            with contextlib.suppress(NotRunning):
                self.cancel()
        if thread is not None:
            # `submit` starts it once `queued` is published: a publish held up (a reconnect's announce)
            # is no reason to fail the stop.
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while thread.ident is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if thread.ident is not None:
                # The worker kills the process at the deadline, then records and publishes the end.
                thread.join(timeout=timeout_s + TICK_S + JOIN_TIMEOUT_S * 2)
        if self._lock.acquire(timeout=JOIN_TIMEOUT_S):
            try:
                self._record_unrecorded()
            finally:
                self._lock.release()

    def _work(self, job: ActiveJob) -> None:
        """The worker thread: running → events → outcome, and the row is always closed."""
        run = job.run
        result: RunResult | None = None
        try:
            # The row stays `queued` until a training process exists to run it.
            process = None if job.cancel_requested.is_set() else self.launcher.start(job.settings, job.request, run)
            with self._lock:
                job.process = process
            if process is not None and job.cancel_requested.is_set():
                process.terminate()  # cancelled while it was being started
            if process is not None:
                run = self.store.mark_running(run.id)  # type: ignore[arg-type]
                job.run = run
                job.phase = Phase.STARTING
                self.listener.run_state(run, Phase.STARTING, "starting the training process")
            if job.process is None:
                result = RunResult(
                    run_identifier=run.run_identifier, status=RunStatus.CANCELLED, base_model=run.base_model or ""
                )
            else:
                result = self._follow(job, job.process)
        except Exception as exc:  # the worker thread's outermost frame: the run fails, the daemon lives
            _LOGGER.exception("Run %s failed in the worker", run.run_identifier)
            result = crash_result(run, exc)
        finally:
            if job.process is not None:
                self._stop(job.process, grace_s=JOIN_TIMEOUT_S)
                # A process killed mid-save leaves its staging folders; a clean end has removed them.
                staging = artifacts.staging_dir(job.settings.storage.output_dir, run.run_identifier)
                for folder in (staging, artifacts.trainer_scratch_dir(staging)):
                    shutil.rmtree(folder, ignore_errors=True)
            if result is None:
                result = crash_result(run, "the worker stopped unexpectedly")
            with self._lock:  # from here a cancel is refused: the one decision below is final
                job.finishing = True
            if job.cancel_requested.is_set() and result.status is RunStatus.FAILED:
                # Killed because we asked it to stop: that is a cancellation, not a failure.
                result = result.model_copy(update={"status": RunStatus.CANCELLED, "error": None})
            elif job.cancel_requested.is_set() and self._accepting and result.status is RunStatus.COMPLETED:
                # A user's cancel was answered `ok` as the run was moving its directory into place: too
                # late for the process to stop, so the run is taken back here, never served. (A shutdown
                # cancels too; a run that finished meanwhile is kept as it is.)
                if result.run_dir:
                    shutil.rmtree(result.run_dir, ignore_errors=True)
                cancelled = {"status": RunStatus.CANCELLED, "run_dir": None, "decision": None, "decision_reason": None}
                result = result.model_copy(update=cancelled)
            if result.status is RunStatus.CANCELLED and not self._accepting and not result.error:
                # Not a user's cancel: the history and HomeIQ's table say why the run did not finish.
                result = result.model_copy(update={"error": SHUTDOWN_CANCEL_REASON})
            recorded = self._recorded(run, result)
            if recorded is None:
                finished = run
                result = _not_served_late(result)  # what is published must not say "promoted"
                with self._lock:
                    self._unrecorded.append((run, result))
            else:
                finished = recorded
                # As recorded: a run chosen but not servable (a disk that refuses) was kept out.
                decided = {"decision": known(Decision, finished.decision), "decision_reason": finished.decision_reason}
                result = result.model_copy(update={"promoted": bool(finished.promoted), **decided})
            try:
                # Published before the runner accepts the next run, so the two never interleave.
                self.listener.run_finished(finished, result)
            finally:
                with self._lock:
                    self._active = None

    def _recorded(self, run: TrainingRun, result: RunResult) -> TrainingRun | None:
        """The run's end recorded (and its adapter served where chosen); None when the history refuses."""
        for attempt, delay_s in enumerate((0.0, *RECORD_RETRY_DELAYS_S)):
            if attempt and self._stopping.wait(delay_s):
                break  # shutting down: `shutdown` tries once more after the worker has published the end
            if (row := self._try_record(run, result)) is not None:
                return row
        _LOGGER.error(
            "Run %s stays open in the history; its end is recorded again before the next run", run.run_identifier
        )
        return None

    def _try_record(self, run: TrainingRun, result: RunResult) -> TrainingRun | None:
        """One attempt at recording the run's end; its row as recorded, or None (logged) when refused."""
        try:
            row = self.store.get(run.id)  # type: ignore[arg-type]
            if row is not None and row.status not in (RunStatus.QUEUED.value, RunStatus.RUNNING.value):
                return row  # recorded by an attempt whose housekeeping was what failed
            return conclude(self.store, self.settings, run, result)
        except Exception as exc:
            _LOGGER.warning(
                "Could not record the end of run %s: %s: %s", run.run_identifier, type(exc).__name__, first_line(exc)
            )
            _LOGGER.debug("The history's error", exc_info=True)
            return None

    def _record_unrecorded(self) -> None:
        """Record the ends the history refused before (under the lock); those it refuses again wait on."""
        waiting, self._unrecorded = self._unrecorded, []
        for run, result in waiting:
            if self._try_record(run, result) is None:
                self._unrecorded.append((run, result))
            else:
                _LOGGER.info("Recorded the end of run %s (%s) after all", run.run_identifier, result.status.value)

    def _follow(self, job: ActiveJob, process: TrainingProcess) -> RunResult:
        stall = self.settings.daemon.stall_timeout_s
        deadline_kill: float | None = None
        last_progress: ProgressEvent | None = None
        last_forwarded = time.monotonic()
        try:
            for event in process.events(stall):
                if isinstance(event, RunResult):
                    return event
                if isinstance(event, PhaseEvent):
                    job.phase = event.phase
                    last_progress = None
                    self.listener.run_state(job.run, event.phase, event.message)
                elif isinstance(event, ProgressEvent):
                    last_progress, last_forwarded = event, time.monotonic()
                    self.listener.run_progress(job.run, event)
                elif last_progress is not None and time.monotonic() - last_forwarded >= PROGRESS_HEARTBEAT_S:
                    # Slow steps (a big model on a small CPU): repeat the last figure so watchers
                    # see the run is alive.
                    last_forwarded = time.monotonic()
                    self.listener.run_progress(job.run, last_progress)
                if job.cancel_requested.is_set() and deadline_kill is None:
                    deadline_kill = time.monotonic() + self.settings.daemon.stop_timeout_s
                if deadline_kill is not None and time.monotonic() > deadline_kill:
                    _LOGGER.warning("Training process did not stop in time; killing it")
                    self._stop(process, grace_s=0)
                    break
        except Stalled as exc:
            self._stop(process, grace_s=0)
            return crash_result(job.run, str(exc))
        self._stop(process, grace_s=self.settings.daemon.stop_timeout_s)
        return crash_result(job.run, process.failure_text())

    @staticmethod
    def _stop(process: TrainingProcess, grace_s: float) -> None:
        """Wait up to `grace_s` for the process to exit (0: not at all), then kill it and reap it."""
        if grace_s <= 0 or process.wait(grace_s) is None:
            process.kill()
            process.wait(JOIN_TIMEOUT_S)


def _not_served_late(result: RunResult) -> RunResult:
    """A chosen run whose end the history refused: never served unasked later, and not said to be."""
    if result.decision is not Decision.PROMOTED:
        return result
    late = "chosen, but its end could not be recorded in time, so it was not served; promote it to serve it"
    return result.model_copy(update={"decision": Decision.KEPT_CURRENT, "decision_reason": late})


class ShuttingDown(Exception):
    """The runner accepts no more runs."""
