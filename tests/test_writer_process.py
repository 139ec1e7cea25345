"""The writer process (bdh_fast/telemetry/backends/process.py): the Logger's backends run there, with
the Writer's guarantees, and the training process never builds their payloads.

Faults are injected the way they happen: a backend raising inside the writer process (patched there
by a sitecustomize on its PYTHONPATH), the writer process killed, the training process killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bdh_fast.logger import Logger

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals and /proc")


def read_steps(run_dir) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


def test_records_in_order_and_durable_at_flush(tmp_path):
    logger = Logger("jsonl,tensorboard", log_dir=tmp_path)
    assert logger.backend_names == ["jsonl", "tensorboard"] and logger.failed == []
    for step in range(1, 201):
        logger.log_metrics({"train/loss": 1.0 / step}, step)
    assert logger.flush(timeout=60)
    assert read_steps(tmp_path) == list(range(1, 201))  # on disk when flush returns (before a checkpoint)
    logger.log_text("notes", "after the flush", 200)
    assert logger.finish()
    assert not alive(logger._process.proc.pid)


def test_a_backend_failing_in_the_writer_process_is_dropped_with_one_warning(tmp_path, monkeypatch, capfd):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(textwrap.dedent("""
        from bdh_fast.telemetry.backends.tensorboard import TensorBoardBackend
        calls = [0]
        real = TensorBoardBackend.log_metrics
        def flaky(self, metrics, step):
            calls[0] += 1
            if calls[0] == 3:
                raise OSError("disk full (injected)")
            return real(self, metrics, step)
        TensorBoardBackend.log_metrics = flaky
    """))
    monkeypatch.setenv("PYTHONPATH", str(inject))  # the writer process's, not this one's
    logger = Logger("tensorboard,jsonl", log_dir=tmp_path / "run")
    for step in range(1, 11):
        logger.log_metrics({"train/loss": float(step)}, step)
        logger.flush(timeout=60)
    assert logger.finish()
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "tensorboard" in warnings[0] and "disk full (injected)" in warnings[0], err
    assert logger.failed == ["tensorboard"]
    assert read_steps(tmp_path / "run") == list(range(1, 11))  # the other backend got every record


def test_the_writer_process_killed_costs_its_records_not_the_training(tmp_path, capsys):
    logger = Logger("jsonl", log_dir=tmp_path)
    logger.log_metrics({"train/loss": 1.0}, 1)
    assert logger.flush(timeout=60)
    logger._process.proc.kill()
    logger._process.proc.wait()
    for step in range(2, 50):  # never raises, never blocks
        logger.log_metrics({"train/loss": 1.0}, step)
    logger.flush(timeout=60)
    assert logger.finish(timeout=30)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "writer process" in warnings[0], warnings
    assert "writer process" in logger.failed
    assert read_steps(tmp_path) == [1]


def test_sigint_and_sigterm_to_the_process_group_leave_the_writer_to_the_training_process(tmp_path):
    logger = Logger("jsonl", log_dir=tmp_path)
    pid = logger._process.proc.pid
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    logger.log_metrics({"train/loss": 1.0}, 1)
    assert logger.flush(timeout=60) and read_steps(tmp_path) == [1]
    assert logger.finish() and logger.failed == []


TRAINER = """
import sys, time
from bdh_fast.logger import Logger
logger = Logger("tensorboard,jsonl,wandb", log_dir=sys.argv[1], wandb_mode="offline")
logger.log_metrics({"train/loss": 1.0}, 1)
logger.flush()
print(logger._process.proc.pid, "tensorboard" in sys.modules, "wandb" in sys.modules, flush=True)
if sys.argv[2] == "hang":
    time.sleep(600)
logger.finish()
"""


def offline_env(tmp_path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "WANDB_SILENT": "true",
            "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_DATA_DIR": str(tmp_path / "data")}


def test_the_training_process_imports_neither_tensorboard_nor_wandb(tmp_path):
    proc = subprocess.run([sys.executable, "-c", TRAINER, str(tmp_path / "run"), "end"], capture_output=True,
                          text=True, timeout=300, env=offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    _, tensorboard, wandb = proc.stdout.split()
    assert (tensorboard, wandb) == ("False", "False")  # their payloads are built in the writer process
    assert read_steps(tmp_path / "run") == [1]


def test_the_writer_process_dies_with_a_killed_training_process(tmp_path):
    """After kill -9 no writer may go on writing the run's files while the run is resumed."""
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path / "run"), "hang"], stdout=subprocess.PIPE,
                            text=True, env=offline_env(tmp_path))
    try:
        writer_pid = int(proc.stdout.readline().split()[0])
        assert alive(writer_pid)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while alive(writer_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(writer_pid)


def test_a_logger_made_in_a_thread_outlives_the_thread(tmp_path):
    import threading

    made = []
    thread = threading.Thread(target=lambda: made.append(Logger("jsonl", log_dir=tmp_path)))
    thread.start()
    thread.join()
    time.sleep(1.0)  # several of the writer process's parent checks
    logger = made[0]
    logger.log_metrics({"train/loss": 1.0}, 1)
    assert logger.flush(timeout=60) and read_steps(tmp_path) == [1]
    assert logger.finish() and logger.failed == []
