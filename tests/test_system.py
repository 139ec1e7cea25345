"""GPUSampler against no driver and against a fake pynvml; allocator stats off CUDA."""

import sys
import threading
import time
import types

import pytest
import torch

from bdh_fast.telemetry.system import STOP_AFTER_FAILED_SAMPLES, GPUSampler, cuda_memory_stats


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


def make_fake_pynvml(init_error=None):
    """Two GPUs (NVML indices 0, 1; UUIDs GPU-a, GPU-b). Values change per call so means are
    checkable; GPU 1 does not support power readings."""
    calls = {"init": 0, "shutdown": 0, "power": {0: 0, 1: 0}}
    util = {0: iter([10, 30, 50]), 1: iter([50, 70, 90])}
    power_mw = {0: iter([100_000, 300_000, 500_000])}
    reasons = {0: iter([0x1, 0x4, 0x1]), 1: iter([0x1, 0x1, 0x1])}  # 0x1 idle, 0x4 SW power cap

    fake = types.ModuleType("pynvml")
    fake.NVMLError = NVMLError
    fake.NVMLError_NotSupported = NVMLError_NotSupported
    fake.NVML_TEMPERATURE_GPU = 0
    fake.NVML_CLOCK_SM = 1
    fake.nvmlClocksEventReasonGpuIdle = 0x1
    fake.calls = calls

    def nvmlInit():
        if init_error is not None:
            raise init_error
        calls["init"] += 1

    def nvmlShutdown():
        calls["shutdown"] += 1

    def get_power(h):
        calls["power"][h] += 1
        if h == 1:
            raise NVMLError_NotSupported("Not Supported")
        return next(power_mw[h])

    fake.nvmlInit = nvmlInit
    fake.nvmlShutdown = nvmlShutdown
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetHandleByUUID = lambda uuid: {"GPU-a": 0, "GPU-b": 1}[uuid]
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=next(util[h]), memory=0)
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(2 + h) * 2**30, total=80 * 2**30, free=0)
    fake.nvmlDeviceGetPowerUsage = get_power
    fake.nvmlDeviceGetTemperature = lambda h, sensor: 60 + h
    fake.nvmlDeviceGetClockInfo = lambda h, clock: 1500 + h
    fake.nvmlDeviceGetCurrentClocksEventReasons = lambda h: next(reasons[h])
    return fake


@pytest.fixture
def fake_nvml(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def assert_off(sampler, capsys, threads_before):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nvml: not available (") and "GPU stats off" in err[0]
    assert sampler.thread is None
    assert threading.active_count() == threads_before
    assert sampler.window_means() == {}
    sampler.close()


def test_no_driver_on_this_machine(capsys):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except Exception:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML driver")
    before = threading.active_count()
    assert_off(GPUSampler(interval_s=0.01).start(), capsys, before)


def test_init_failure_and_missing_library(monkeypatch, capsys):
    before = threading.active_count()
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml(init_error=NVMLError("Driver Not Loaded")))
    sampler = GPUSampler(interval_s=0.01).start()
    assert "Driver Not Loaded" in capsys.readouterr().err
    sampler.close()
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert_off(GPUSampler(interval_s=0.01).start(), capsys, before)


def test_interval_zero_is_silent_and_threadless(fake_nvml, capsys):
    sampler = GPUSampler(interval_s=0).start()
    assert sampler.thread is None and sampler.window_means() == {}
    assert capsys.readouterr().err == "" and fake_nvml.calls["init"] == 0
    sampler.close()


def test_window_means_over_two_fake_gpus(fake_nvml):
    sampler = GPUSampler(interval_s=3600).start()  # start() samples once; the thread then waits
    assert sampler.thread is not None and sampler.thread.daemon
    sampler.sample()
    means = sampler.window_means()
    expected = {
        "system/gpu0/util": 20.0,
        "system/gpu0/mem_used_gb": 2.0,
        "system/gpu0/mem_total_gb": 80.0,
        "system/gpu0/power_w": 200.0,
        "system/gpu0/temp_c": 60.0,
        "system/gpu0/sm_clock_mhz": 1500.0,
        "system/gpu0/throttle_reasons": float(0x1 | 0x4),
        "system/gpu0/throttled": 1.0,
        "system/gpu1/util": 60.0,
        "system/gpu1/mem_used_gb": 3.0,
        "system/gpu1/mem_total_gb": 80.0,
        "system/gpu1/temp_c": 61.0,
        "system/gpu1/sm_clock_mhz": 1501.0,
        "system/gpu1/throttle_reasons": 1.0,
        "system/gpu1/throttled": 0.0,  # idle only is not throttling
    }
    assert means == pytest.approx(expected)
    assert "system/gpu1/power_w" not in means
    assert fake_nvml.calls["power"][1] == 1  # NotSupported is not asked again

    assert sampler.window_means() == {}  # the window restarts at every call
    sampler.sample()
    assert sampler.window_means()["system/gpu0/util"] == 50.0

    thread = sampler.thread
    sampler.close()
    assert not thread.is_alive() and sampler.thread is None
    assert fake_nvml.calls["shutdown"] == 1
    sampler.close()  # idempotent
    assert fake_nvml.calls["shutdown"] == 1


def test_cuda_visible_devices_maps_to_nvml_handles(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-b")
    sampler = GPUSampler(interval_s=3600).start()
    means = sampler.window_means()
    sampler.close()
    assert means["system/gpu0/util"] == 50.0  # cuda:0 is NVML device 1
    assert not any(name.startswith("system/gpu1/") for name in means)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    sampler = GPUSampler(interval_s=3600, device_indices=[1]).start()
    means = sampler.window_means()
    sampler.close()
    assert means["system/gpu1/util"] == 10.0  # cuda:1 is NVML device 0
    assert "system/gpu1/power_w" in means and not any(n.startswith("system/gpu0/") for n in means)


def test_cuda_memory_stats_off_cuda():
    assert cuda_memory_stats("cpu") == {}
    assert cuda_memory_stats(torch.device("cpu")) == {}


# --- the CUDA path can never end a run: every NVML failure is one line, the sampler keeps its contract


def nvml_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("nvml: ")]


def test_init_failure_is_one_line_and_stats_off(monkeypatch, capsys):
    before = threading.active_count()
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml(init_error=NVMLError("Driver Not Loaded")))
    assert_off(GPUSampler(interval_s=0.01).start(), capsys, before)
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_pynvml(init_error=NVMLError()))  # no message
    sampler = GPUSampler(interval_s=0.01).start()
    assert capsys.readouterr().err == "nvml: not available (NVMLError); GPU stats off\n"
    sampler.close()


def wait_for(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_every_query_failing_warns_once_then_the_sampler_stops(fake_nvml, capsys):
    def broken(*args):
        raise NVMLError("Unknown Error")

    for name in ("nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetPowerUsage",
                 "nvmlDeviceGetTemperature", "nvmlDeviceGetClockInfo", "nvmlDeviceGetCurrentClocksEventReasons"):
        setattr(fake_nvml, name, broken)
    sampler = GPUSampler(interval_s=0.01).start()  # start() does not raise; its thread ticks
    assert wait_for(lambda: sampler.stopped)
    sampler.thread.join(5)
    assert not sampler.thread.is_alive()  # the sampler stopped itself, training went on
    lines = nvml_lines(capsys)
    assert len(lines) == 2, lines
    assert lines[0] == ("nvml: GPU sampling failed (util of gpu0: NVMLError: Unknown Error); the values it "
                        "cannot read are left out, sampling goes on")
    assert lines[1].startswith(f"nvml: {STOP_AFTER_FAILED_SAMPLES} GPU samples in a row failed")
    assert lines[1].endswith("; GPU stats off")
    assert sampler.window_means() == {}
    sampler.sample()  # a stopped sampler samples nothing and says nothing more
    assert nvml_lines(capsys) == [] and sampler.window_means() == {}
    sampler.close()
    assert fake_nvml.calls["shutdown"] == 1


def test_one_failing_query_warns_once_and_the_others_go_on(fake_nvml, capsys):
    def lost_clock(h, clock):
        raise NVMLError("GPU is lost")

    fake_nvml.nvmlDeviceGetClockInfo = lost_clock
    sampler = GPUSampler(interval_s=3600).start()
    sampler.sample()
    sampler.sample()
    means = sampler.window_means()
    assert means["system/gpu0/util"] == 30.0 and "system/gpu0/sm_clock_mhz" not in means
    assert nvml_lines(capsys) == ["nvml: GPU sampling failed (sm_clock of gpu0: NVMLError: GPU is lost); the "
                                  "values it cannot read are left out, sampling goes on"]
    assert not sampler.stopped
    sampler.close()


def test_sampling_that_raises_mid_run_never_raises_and_keeps_the_good_window(fake_nvml, capsys):
    sampler = GPUSampler(interval_s=3600).start()  # sample 1 (in start) and 2 below are good
    sampler.sample()
    fake_nvml.nvmlDeviceGetUtilizationRates = lambda h: object()  # a binding answering in another shape
    for _ in range(STOP_AFTER_FAILED_SAMPLES - 1):
        sampler.sample()  # AttributeError inside the sample: caught, counted, never raised
    assert not sampler.stopped
    means = sampler.window_means()
    assert means["system/gpu0/util"] == 20.0 and means["system/gpu1/util"] == 60.0  # the two good samples
    lines = nvml_lines(capsys)
    assert len(lines) == 1 and "GPU sampling failed (AttributeError: " in lines[0]
    sampler.sample()
    assert sampler.stopped
    lines = nvml_lines(capsys)
    assert len(lines) == 1 and "GPU samples in a row failed (last: AttributeError" in lines[0]
    assert sampler.window_means() == {}
    sampler.close()


def test_a_good_sample_resets_the_failure_count(fake_nvml, capsys):
    fake_nvml.nvmlDeviceGetPowerUsage = lambda h: 100_000  # endless values: many samples below
    fake_nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x1
    good = lambda h: types.SimpleNamespace(gpu=10, memory=0)  # noqa: E731
    sampler = GPUSampler(interval_s=3600).start()
    for _ in range(3):
        fake_nvml.nvmlDeviceGetUtilizationRates = lambda h: object()
        for _ in range(STOP_AFTER_FAILED_SAMPLES - 1):
            sampler.sample()
        fake_nvml.nvmlDeviceGetUtilizationRates = good
        sampler.sample()
    assert not sampler.stopped  # never STOP_AFTER_FAILED_SAMPLES failures in a row
    assert len(nvml_lines(capsys)) == 1  # and the first failure was the only line
    sampler.close()


def test_window_means_never_raises(fake_nvml, capsys):
    sampler = GPUSampler(interval_s=3600).start()
    sampler._sums["system/gpu0/util"] = "garbage"  # whatever got into the window
    assert sampler.window_means() == {}
    lines = nvml_lines(capsys)
    assert len(lines) == 1 and "unreadable (TypeError" in lines[0]
    sampler.sample()
    assert sampler.window_means()["system/gpu0/util"] == 30.0  # the next window is fine again
    sampler.close()
    assert GPUSampler(interval_s=0).window_means() == {}  # never started
