"""A local deployment on real Flower processes: one SuperLink, SuperNodes, ``flwr run``.

For tests, demos and a first look at a deployment (docs/deployment.md). Each
SuperNode serves the instance its node config names (:class:`NodeSpec`); rounds,
sampling and run id come from the run config. Every process is started here,
recorded by PID and stopped by PID (with the helper processes Flower starts under
them); nothing is found or killed by name. Addresses are ``127.0.0.1`` unless a
caller names another host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from layerfed.deploy.node import DeployError, NodeSpec, free_port, run_config_string
from layerfed.deploy.tls import TlsFiles

__all__ = ["CONNECTION", "LocalDeployment", "pid_running"]

log = logging.getLogger("layerfed")
CONNECTION = "layerfed-local"
BIN = Path(sys.executable).parent


class LocalDeployment:
    """A SuperLink and SuperNodes started as child processes; a context manager that stops them."""

    def __init__(
        self,
        workdir: Path,
        *,
        tls: TlsFiles | None = None,
        node_auth: bool = False,
        host: str = "127.0.0.1",
        database: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        if node_auth and tls is None:
            raise DeployError("node_auth", "TLS files (Flower needs TLS for node auth)", "none")
        self.workdir = workdir
        self.tls = tls
        self.node_auth = node_auth
        self.host = host
        self.database = database
        """SuperLink state file (``--database``): registered SuperNodes and runs survive a
        restart; None keeps the state in memory."""
        self.cwd = cwd or workdir
        """Working directory of every process (the run config's relative paths resolve here)."""
        self.port = 0
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "FLWR_HOME": str(workdir / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs share one port in 1.42)."""
        return f"{self.host}:{self.port}"

    def _tls_args(self, server: bool) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        if not server:
            return ["--root-certificates", str(self.tls.ca_cert)]
        return [
            *("--ssl-ca-certfile", str(self.tls.ca_cert)),
            *("--ssl-certfile", str(self.tls.server_cert)),
            *("--ssl-keyfile", str(self.tls.server_key)),
        ]

    def _spawn(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        log_file = (self.workdir / "logs" / f"{name}.log").open("ab")
        with log_file:
            process = subprocess.Popen(
                list(command),
                cwd=self.cwd,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = process
        log.info("started %s (pid %s)", name, process.pid)
        return process

    def start_superlink(self, timeout: float = 60.0, port: int = 0) -> None:
        """Start the SuperLink (on ``port``, or a free one) and wait until it accepts connections."""
        self.port = port or free_port(self.host)
        command = [
            str(BIN / "flower-superlink"),
            *self._tls_args(server=True),
            "--disable-runtime-dependency-installation",
            *("--host", self.host, "--port", str(self.port)),
        ]
        if self.node_auth:
            command.append("--enable-supernode-auth")
        if self.database is not None:
            self.database.parent.mkdir(parents=True, exist_ok=True)
            command += ["--database", str(self.database.resolve())]
        self._spawn("superlink", command)
        self._wait_port(self.port, "superlink", timeout)
        self._write_connection()

    def _write_connection(self) -> None:
        entry = [f'address = "{self.address}"']
        if self.tls is None:
            entry.append("insecure = true")
        else:
            entry.append(f"root-certificates = {json.dumps(str(self.tls.ca_cert))}")
        text = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(text + "\n".join(entry) + "\n", encoding="utf-8")

    def _wait_port(self, port: int, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                with socket.create_connection((self.host, port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)
        raise DeployError(name, f"a listener on {self.host}:{port} within {timeout}s", "none")

    def _check_alive(self, name: str) -> None:
        code = self.processes[name].poll()
        if code is not None:
            raise DeployError(name, "a running process", f"exit code {code}; see {self._log(name)}")

    def _log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key with ``flwr supernode register``; its node id."""
        out = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        data = _json_out(out, "flwr supernode register")
        if "node-id" not in data:
            got = str(data.get("error-message", data))[:300]
            raise DeployError(f"flwr supernode register {public_key}", "a node id", got)
        return int(data["node-id"])

    def registered(self) -> list[dict[str, Any]]:
        """The SuperNodes the SuperLink knows (``flwr supernode ls``), one dict each."""
        out = _json_out(self.flwr("supernode", "ls", CONNECTION, "--format", "json"), "ls")
        nodes = out.get("nodes", [])
        if not isinstance(nodes, list):
            raise DeployError("flwr supernode ls", "a list under 'nodes'", repr(nodes)[:300])
        return [n for n in nodes if isinstance(n, dict)]

    def start_supernode(self, node: NodeSpec) -> None:
        """Start one SuperNode hosting ``node`` (its Runtime API on a free local port)."""
        command = [
            str(BIN / "flower-supernode"),
            *self._tls_args(server=False),
            *("--superlink", self.address),
            *("--host", "127.0.0.1", "--port", str(free_port())),
            *("--node-config", node.node_config()),
        ]
        if node.auth_key is not None:
            command += ["--auth-supernode-private-key", str(node.auth_key)]
        self._spawn(f"supernode-{node.instance_id}", command)

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run the ``flwr`` CLI against this deployment and return its stdout."""
        command = [str(BIN / "flwr"), *args]
        try:
            done = subprocess.run(
                command,
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise DeployError(" ".join(args[:2]), f"an answer within {timeout}s", "none") from e
        if done.returncode != 0:
            got = f"exit code {done.returncode}: {done.stderr.decode()[-2000:]}{done.stdout.decode()[-2000:]}"
            raise DeployError(f"flwr {' '.join(args[:2])}", "exit code 0", got)
        return done.stdout.decode()

    def run(self, app: Path, run_config: Mapping[str, Any], timeout: float = 600.0) -> int:
        """Submit the Flower App at ``app`` with ``flwr run`` (it builds the FAB); the run id."""
        args = ["run", str(app), CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", run_config_string(run_config)]
        return int(_json_out(self.flwr(*args, timeout=timeout), "flwr run")["run-id"])

    def run_log(self, run_id: int) -> str:
        """The ServerApp's log of a run, as ``flwr log --show`` prints it."""
        return self.flwr("log", str(run_id), CONNECTION, "--show")

    def run_status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        runs = _json_out(out, "flwr ls").get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"

    def wait_finished(self, run_id: int, timeout: float, poll: float = 3.0) -> str:
        """Wait until the run has finished (any outcome) and return its status."""
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            self._check_alive("superlink")
            status = self.run_status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(poll)
        raise DeployError(f"run {run_id}", f"a finished run within {timeout}s", status)

    def process_tree(self) -> list[int]:
        """PIDs of the running processes started here and of the helpers Flower started under them."""
        return _descendants([p.pid for p in self.processes.values() if p.poll() is None])

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process started here, and the helpers Flower started under them, by PID."""
        roots = {p.pid for p in self.processes.values()}
        helpers = [pid for pid in self.process_tree() if pid not in roots]
        for process in self.processes.values():
            _signal(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(process.pid, signal.SIGKILL)
                process.wait(timeout=grace)
        _stop_helpers(helpers, grace)
        self.processes.clear()


def _json_out(text: str, where: str) -> dict[str, Any]:
    start = text.find("{")
    try:
        data = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise DeployError(where, "a JSON object on stdout", repr(text[-300:]))
    return data


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(roots: Sequence[int]) -> list[int]:
    """``roots`` and the PIDs below them in the process tree (psutil, any platform)."""
    found: list[int] = []
    for pid in roots:
        found.append(pid)
        with contextlib.suppress(psutil.Error):
            found.extend(child.pid for child in psutil.Process(pid).children(recursive=True))
    return found


def _stop_helpers(pids: Sequence[int], grace: float) -> None:
    """Give Flower's helpers (they watch their parent) time to exit; then end them by PID."""
    deadline = time.monotonic() + grace
    while any(pid_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if pid_running(p)]
        for pid in alive:
            log.warning("stopping leftover process %s with %s", pid, sig.name)
            _signal(pid, sig)
        time.sleep(1.0 if alive else 0.0)
