"""The backends in a process of their own, so that TensorBoard's protobufs, W&B's payloads and the
disk never take the training process's interpreter lock from the thread that launches kernels.

    training process                                 writer process (python -m ...backends.process)
    Logger -> Writer (bounded queue, one thread) -> ProcessBackend ==pipe==> Writer -> backends

The training side is the same Writer as ever with one backend, `ProcessBackend`, which pickles each
record (host numbers, Histogram buckets, sample text) onto the writer process's stdin. The writer
process runs a Writer over the real backends, so everything the Writer guarantees holds as before:
records in order; a failing backend dropped with one warning; a stalled one bounded; `flush()`
returns once every backend has synced what was logged before it (durable before a checkpoint);
`finish()` closes every backend, with a timeout. The writer process's output (warnings, W&B's lines)
comes back to the training process's stderr.

It dies with the training process (a thread watches the parent's pid): after a kill -9 no second
writer goes on writing the run's files while the run is resumed. It ignores
SIGINT and SIGTERM, which a terminal or a scheduler sends to the whole process group: the training
process decides when logging ends, and finishes it.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from bdh_fast.errors import UserError
from bdh_fast.telemetry.backends.base import Backend

START_TIMEOUT_S = 600.0  # the backends' start-up (W&B's init may wait on a slow machine)
EXIT_TIMEOUT_S = 10.0  # after its finish was answered, how long the writer process may take to exit


class ProcessBackend(Backend):
    """The training side of the writer process: a backend whose every call is one pickled message."""

    name = "writer process"

    def __init__(self, names: list[str], log_dir: str, config: dict, resume_step: int | None,
                 options: dict[str, Any], finish_timeout_s: float):
        """Starts the writer process and its backends; returns once they started. Raises UserError
        with the backends' own message (a bad W&B mode, ...)."""
        self.finish_timeout_s = finish_timeout_s
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env())
        self._forwarder = threading.Thread(target=_forward, args=(self.proc.stderr,), daemon=True,
                                           name="bdh-logger-output")
        self._forwarder.start()
        self._send(("start", names, log_dir, config, resume_step, options, finish_timeout_s))
        self.proc.stdin.flush()
        reply = self._receive()
        if reply[0] == "user_error":
            self._wait_exit()
            raise UserError(reply[1])
        if reply[0] != "started":
            self._wait_exit()
            raise RuntimeError(f"the writer process did not start: {reply}")
        self.started, self.failed = reply[1], reply[2]
        self.on_failed: Callable[[list[str]], None] = lambda names: None  # told each time it learns more
        self.dropped = 0

    def _send(self, message: tuple) -> None:
        pickle.dump(message, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)

    def _receive(self) -> tuple:
        try:
            return pickle.load(self.proc.stdout)
        except EOFError:
            code = self.proc.wait()
            return ("exited", code)

    def _call(self, method: str, *args) -> None:
        self._send(("call", method, args))

    def log_metrics(self, metrics, step):
        self._call("log_metrics", metrics, step)

    def log_text(self, name, text, step):
        self._call("log_text", name, text, step)

    def log_table(self, name, columns, rows, step):
        self._call("log_table", name, columns, rows, step)

    def log_histogram(self, name, hist, step):
        self._call("log_histogram", name, hist, step)

    def log_artifact(self, path, name, kind):
        self._call("log_artifact", path, name, kind)

    def log_alert(self, title, text, step):
        self._call("log_alert", title, text, step)

    def flush(self) -> None:
        self.proc.stdin.flush()  # the end of a batch: hand it over

    def sync(self) -> None:
        """Every record sent so far written and synced by every backend over there."""
        self._send(("sync",))
        self.proc.stdin.flush()
        reply = self._receive()
        if reply[0] != "synced":
            raise RuntimeError(f"the writer process ended: {reply}")
        self.failed = reply[1]
        self.on_failed(self.failed)

    def finish(self) -> None:
        try:
            self._send(("finish",))
            self.proc.stdin.flush()
            reply = self._receive()
            if reply[0] == "finished":
                _, _, self.failed, self.dropped = reply
                self.on_failed(self.failed)
        finally:
            self._wait_exit()

    def _wait_exit(self) -> None:
        try:
            self.proc.stdin.close()  # the writer process's end of input
        except OSError:
            pass
        try:
            self.proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._forwarder.join(EXIT_TIMEOUT_S)  # its last lines are out before finish returns


def _child_env() -> dict[str, str]:
    """This environment, with the directory bdh_fast is imported from first on the path: the writer
    process imports the same code however this one found it (installed, a checkout, sys.path)."""
    import bdh_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(bdh_fast.__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join([root, path])}


def _forward(stream) -> None:
    """The writer process's output, line by line, onto this process's stderr (as it is then: a
    redirect or pytest's capture sees it)."""
    for line in iter(stream.readline, b""):
        sys.stderr.write(line.decode(errors="replace"))
        sys.stderr.flush()


# --- the writer process --------------------------------------------------------------------------


PARENT_POLL_S = 0.2


def _die_with_parent() -> None:
    """Exit as soon as the training process is gone, even while a backend call is blocked: a thread
    polls the parent's pid. (Not PR_SET_PDEATHSIG, which fires when the *thread* that started this
    process ends; nor the end of stdin alone, which never comes while a forked child of the training
    process, a data loader worker, holds the pipe.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="bdh-writer-parent-watch", daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def main() -> None:
    _die_with_parent()
    replies = os.fdopen(os.dup(1), "wb")  # the replies' channel; print() goes to stderr from here on
    os.dup2(2, 1)
    requests = sys.stdin.buffer

    def reply(*message) -> None:
        pickle.dump(message, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()

    from bdh_fast.telemetry.backends import make_backends
    from bdh_fast.telemetry.backends.writer import Writer

    try:
        _, names, log_dir, config, resume_step, options, finish_timeout_s = pickle.load(requests)
        backends, failed = make_backends(names, log_dir, config, resume_step, **options)
    except UserError as e:
        reply("user_error", str(e))
        return
    writer = Writer(backends, finish_timeout_s=finish_timeout_s)
    writer.failed.extend(failed)
    reply("started", [b.name for b in backends], list(writer.failed))
    while True:
        try:
            message = pickle.load(requests)
        except EOFError:  # the training process is gone without a finish: so is this one
            os._exit(0)
        kind = message[0]
        if kind == "call":
            getattr(writer, message[1])(*message[2])
        elif kind == "sync":
            writer.flush()
            reply("synced", list(writer.failed))
        elif kind == "finish":
            ok = writer.finish()
            sys.stdout.flush()
            sys.stderr.flush()
            reply("finished", ok, list(writer.failed), writer.dropped)
            return


if __name__ == "__main__":
    main()
