"""A local Ray cluster for tests and benchmarks: one head on loopback, token authentication on."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .conftest import ALL_CORES, free_port

HEAD_START_TIMEOUT_S = 120


class RayHead:
    """A one-node Ray cluster on loopback with token authentication, started and killed by the tests."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.token = secrets.token_hex(16)
        self.client_port = free_port()
        self.address = f"ray://127.0.0.1:{self.client_port}"
        self.num_cpus = num_cpus
        # Short: Ray puts Unix sockets under it, and their paths are limited to 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))
        self.proc: psutil.Popen | None = None

    def start(self) -> None:
        # Each free when asked, but the kernel may hand the same one out twice in a row: Ray then refuses
        # to start ("... is trying to use a port number ... that is used by other components").
        taken = {self.client_port}

        def another_port() -> int:
            while (port := free_port()) in taken:
                pass
            taken.add(port)
            return port

        ports = {
            "--port": another_port(),
            "--ray-client-server-port": self.client_port,
            "--node-manager-port": another_port(),
            "--object-manager-port": another_port(),
            "--dashboard-agent-listen-port": another_port(),
            "--dashboard-agent-grpc-port": another_port(),
            "--runtime-env-agent-port": another_port(),
            "--metrics-export-port": another_port(),
        }
        env = {
            **os.environ,
            # `ray start` replaces 127.0.0.1 with the machine's network address unless it believes it
            # is on a laptop; this is the switch for that, and it keeps every server on loopback.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block"]
        command += ["--node-ip-address", "127.0.0.1", "--num-cpus", str(self.num_cpus), "--num-gpus", "0"]
        command += ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(self.temp_dir)]
        command += ["--object-store-memory", str(200 * 2**20)]
        for flag, port in ports.items():
            command += [flag, str(port)]
        log = (self.temp_dir / "head.log").open("wb")
        # A cluster is a machine of its own: its head and workers may use every core, not only the
        # share of the pytest-xdist worker that started it (a dozen processes on one core take minutes).
        taskset = shutil.which("taskset")
        if taskset and ALL_CORES:
            command = [taskset, "-c", ",".join(map(str, ALL_CORES)), *command]
        self.proc = psutil.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.temp_dir / 'head.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the Ray head did not open its client port in time")

    def processes(self) -> list[psutil.Process]:
        """The head and every process it started (Ray's workers run in their own sessions)."""
        if self.proc is None:
            return []
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def train_workers(self) -> list[psutil.Process]:
        """The processes of Ray Train's workers now alive."""
        found = []
        for proc in self.processes():
            try:
                if "RayTrainWorker" in " ".join(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def errors(self) -> str:
        """The end of every client-server log on the head that reports an error, for a failed test's message."""
        tails = []
        for log in sorted(self.temp_dir.glob("session_latest/logs/ray_client_server*.err")):
            text = log.read_text(errors="replace")
            if "Error" in text or "Traceback" in text:
                tails.append(f"--- {log.name}\n{text[-1500:]}")
        return "\n".join(tails) or "(no client-server errors logged on the head)"

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _, alive = psutil.wait_procs(procs, timeout=15)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not alive, f"Ray processes outlived the cluster: {alive}"
