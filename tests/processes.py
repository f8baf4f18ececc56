"""Local processes for tests: free loopback ports, and stopping what a test started by its own id."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def stop_process_group(process: subprocess.Popen, first_signal: int = signal.SIGTERM, grace_s: float = 30) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started, by its group id.

    ``first_signal`` goes to the process group; whatever is left after ``grace_s``
    seconds gets SIGKILL.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, first_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    # The leader may be gone while children it forked (task processes) still run.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=10)


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 1.0):
    """Poll ``condition()`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"Gave up after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)
