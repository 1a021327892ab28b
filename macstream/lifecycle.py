"""Clean stops for the long-running commands: SIGTERM and SIGINT become ``KeyboardInterrupt`` at the next safe point.

A signal that arrives inside a ``deferred()`` block (starting the local broker, ``ray.init``: places where an
exception would leave half-started processes behind) is held and raised when the block ends, so the caller's
``ExitStack`` always stops exactly what had started. Elsewhere it is raised at once, which ``ray.get``/``ray.wait``
and ``time.sleep`` honour.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class GracefulStop:
    """Install with ``with GracefulStop() as stop:``; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._deferring = 0
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.requested = True
        if not self._deferring:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    @contextlib.contextmanager
    def deferred(self):
        """Hold a stop request until the block has finished (then raise it)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self.requested and not self._deferring:
            raise KeyboardInterrupt("stop requested during start-up")
