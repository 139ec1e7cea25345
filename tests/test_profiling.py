"""--profile writes TensorBoard-profiler traces with the loop's and the telemetry's ranges;
--memory_snapshot dumps an allocator snapshot on CUDA and says so in one line elsewhere."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import torch

from bdh_fast import train

from test_train import tiny_args

RANGES = {"data", "forward", "backward", "optimizer", "telemetry/record", "telemetry/flush",
          "telemetry/probe", "eval", "sample", "checkpoint"}


@pytest.fixture(scope="module")
def profiled_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof")
    # Every range falls inside the active window: steps 3-6 (wait 2, warmup 1, active 4).
    assert train.main(tiny_args(corpus, out, "prof", "--max_iters", "8", "--profile", "--profile_wait", "2",
                                "--profile_warmup", "1", "--profile_active", "4", "--log_train_freq", "2",
                                "--probe_freq", "4", "--eval_freq", "4", "--eval_iters", "1",
                                "--generate_freq", "4", "--sample_tokens", "4", "--ckpt_freq", "4")) == 0
    return out


def test_profiled_run_writes_a_trace_with_every_range(profiled_run):
    traces = list((profiled_run / "prof").glob("*.pt.trace.json*"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert RANGES <= names, RANGES - names
    assert any(e.get("args", {}).get("Input Dims") for e in events)  # shapes recorded


def test_tensorboard_profiler_plugin_lists_the_run(profiled_run):
    pytest.importorskip("torch_tb_profiler")
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(profiled_run), "--host", "127.0.0.1", "--port", "0",
                          "--reload_interval", "1"])
    url = board.launch()
    runs: list = []
    deadline = time.time() + 60
    while time.time() < deadline and "prof" not in runs:
        runs = json.loads(urllib.request.urlopen(url + "data/plugin/pytorch_profiler/runs", timeout=10).read())["runs"]
        time.sleep(0.5)
    assert "prof" in runs


def test_memory_snapshot_needs_cuda_one_line(corpus, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("has CUDA: covered by the CUDA test")
    assert train.main(tiny_args(corpus, tmp_path, "m", "--max_iters", "2", "--memory_snapshot", "2")) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "memory_snapshot" in l]
    assert lines == ["--memory_snapshot needs CUDA (it records the CUDA caching allocator); skipped"]
    assert not (tmp_path / "m" / "memory_snapshot.pickle").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_memory_snapshot_on_cuda(corpus, tmp_path):
    assert train.main(tiny_args(corpus, tmp_path, "m", "--max_iters", "4", "--memory_snapshot", "2",
                                "--device", "cuda")) == 0
    assert (tmp_path / "m" / "memory_snapshot.pickle").stat().st_size > 0
