"""GPU health from NVML (sampled on a background thread) and CUDA allocator statistics.

Neither touches the device stream: NVML queries go to the driver, and the allocator numbers are
host-side bookkeeping, so reading them never synchronises with the training step.

GPU stats are optional, so nothing here may end a run (DESIGN.md invariant 9): NVML missing or
failing at start is one `nvml: ...` line on stderr and the stats are off; a failing query or sample
is one line and sampling goes on without those values; a sampler that gathers nothing
STOP_AFTER_FAILED_SAMPLES times in a row stops with one more line. No method raises.
"""

from __future__ import annotations

import os
import sys
import threading

GiB = float(2**30)  # the `_gb` metrics are GiB, as nvidia-smi and torch.cuda.memory_summary count
# Samples in a row that may fail (nothing read) before the sampler stops: a lost GPU or a driver
# reset does not heal, and 5 ticks (10 s at the default interval) tell it from a passing hiccup.
STOP_AFTER_FAILED_SAMPLES = 5


def _say(line: str) -> None:
    """One `nvml: ...` line on stderr; a closed or broken stderr must not take the run down either."""
    try:
        print(f"nvml: {line}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _visible_device_ids() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of ids (integers or GPU-/MIG- UUIDs); None when unset.

    Like CUDA, stop at the first entry that is neither.
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    ids = []
    for entry in value.split(","):
        entry = entry.strip()
        if entry.isdigit() or entry.startswith(("GPU-", "MIG-")):
            ids.append(entry)
        else:
            break
    return ids


def _torch_uuid(index: int) -> str | None:
    """The UUID of CUDA device `index` when torch has already initialised CUDA (we never do it here)."""
    try:
        import torch

        if torch.cuda.is_initialized():
            return "GPU-" + str(torch.cuda.get_device_properties(index).uuid)
    except Exception:
        pass
    return None


class GPUSampler:
    """Samples every visible GPU every `interval_s` seconds; `window_means()` averages per window.

    Metric names are `system/gpu<i>/<metric>` with `i` the CUDA device index the process sees
    (after CUDA_VISIBLE_DEVICES), so gpu0 is `cuda:0`. `device_indices` picks some of those.
    """

    def __init__(self, interval_s: float = 2.0, device_indices: list[int] | None = None):
        self.interval_s = interval_s
        self.device_indices = device_indices
        self.thread: threading.Thread | None = None
        self._nvml = None
        self._handles: list[tuple[int, object]] = []  # (CUDA index, NVML handle)
        self._unsupported: set[tuple[int, str]] = set()  # queries the device said it cannot answer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stopped = False  # gave up after STOP_AFTER_FAILED_SAMPLES failed samples in a row
        self._warned = False  # the first failure has been reported (later ones are not)
        self._failed_in_a_row = 0
        self._sample_error: str | None = None  # the first failure of the sample in progress
        self._reset_window()

    def _reset_window(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._ors: dict[str, int] = {}
        self._maxes: dict[str, float] = {}

    def start(self) -> GPUSampler:
        """Initialise NVML, take a first sample, start the sampling thread. Never raises: without
        NVML (no library, no driver, no GPU) one line says so and the sampler stays off."""
        if self.interval_s <= 0 or self.thread is not None:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:  # no library, no driver, no GPU
            _say(f"not available ({_describe(e)}); GPU stats off")
            return self
        self._nvml = pynvml
        try:
            self._handles = self._resolve_handles()
        except Exception as e:
            self._handles = []
            reason = _describe(e)
        else:
            reason = "no visible GPUs"
        if not self._handles:
            _say(f"not available ({reason}); GPU stats off")
            self.close()
            return self
        self.sample()  # a first sample now, so even a short first window has one
        try:
            self.thread = threading.Thread(target=self._run, name="bdh-gpu-sampler", daemon=True)
            self.thread.start()
        except Exception as e:  # RuntimeError: can't start new thread (a process at its limit)
            self.thread = None
            _say(f"not available (sampler thread: {_describe(e)}); GPU stats off")
            self.close()
        return self

    def _resolve_handles(self) -> list[tuple[int, object]]:
        nvml = self._nvml
        ids = _visible_device_ids()
        if ids is None:
            ids = [str(i) for i in range(nvml.nvmlDeviceGetCount())]
        indices = self.device_indices if self.device_indices is not None else range(len(ids))
        handles = []
        for index in indices:
            # torch's UUID is exact; CUDA_VISIBLE_DEVICES integers are read as NVML (PCI bus) order,
            # which matches CUDA's order on nodes of identical GPUs.
            uuid = _torch_uuid(index)
            ident = uuid or ids[index]
            if ident.startswith(("GPU-", "MIG-")):
                handle = nvml.nvmlDeviceGetHandleByUUID(ident)
            else:
                handle = nvml.nvmlDeviceGetHandleByIndex(int(ident))
            handles.append((index, handle))
        return handles

    def _query(self, index: int, metric: str, fn, *args):
        """One NVML query; None (metric omitted) when it fails. NotSupported is remembered and not
        asked again; any other failure is kept, as the sample's first error, for sample() to report."""
        if (index, metric) in self._unsupported:
            return None
        try:
            return fn(*args)
        except Exception as e:
            not_supported = getattr(self._nvml, "NVMLError_NotSupported", None)
            if not_supported is not None and isinstance(e, not_supported):
                self._unsupported.add((index, metric))  # the device's answer, not a failure
            elif self._sample_error is None:
                self._sample_error = f"{metric} of gpu{index}: {_describe(e)}"
            return None

    def _throttle_reasons(self, handle):
        nvml = self._nvml
        fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if fn is None:  # older bindings
            fn = nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return fn(handle)

    def sample(self) -> None:
        """Query every GPU once and add the values to the current window. Never raises.

        The first failure (a query, or the sample itself) is one line and sampling goes on without
        the values it could not read; after STOP_AFTER_FAILED_SAMPLES samples in a row that read
        nothing, one more line and the sampler stops: GPU stats are off, training goes on.
        """
        if self._nvml is None or self.stopped:
            return
        self._sample_error = None
        try:
            read = self._sample()
        except Exception as e:  # a binding or driver answering in a shape we do not expect
            read, self._sample_error = 0, _describe(e)
        error = self._sample_error
        if error is not None and not self._warned:
            self._warned = True
            _say(f"GPU sampling failed ({error}); the values it cannot read are left out, sampling goes on")
        self._failed_in_a_row = self._failed_in_a_row + 1 if read == 0 and error is not None else 0
        if self._failed_in_a_row >= STOP_AFTER_FAILED_SAMPLES:
            self.stopped = True  # the thread's loop ends; close() still shuts NVML down
            _say(f"{self._failed_in_a_row} GPU samples in a row failed (last: {error}); GPU stats off")

    def _sample(self) -> int:
        """The queries of one sample, added to the window under the lock; returns how many values."""
        nvml = self._nvml
        values: dict[str, float] = {}
        reasons: dict[str, int] = {}
        idle_bit = getattr(nvml, "nvmlClocksEventReasonGpuIdle", getattr(nvml, "nvmlClocksThrottleReasonGpuIdle", 1))
        for index, h in self._handles:
            prefix = f"system/gpu{index}/"
            util = self._query(index, "util", nvml.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                values[prefix + "util"] = float(util.gpu)
            mem = self._query(index, "mem", nvml.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                values[prefix + "mem_used_gb"] = mem.used / GiB
                values[prefix + "mem_total_gb"] = mem.total / GiB
            power = self._query(index, "power", nvml.nvmlDeviceGetPowerUsage, h)
            if power is not None:
                values[prefix + "power_w"] = power / 1000.0  # NVML reports milliwatts
            temp = self._query(index, "temp", nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
            if temp is not None:
                values[prefix + "temp_c"] = float(temp)
            clock = self._query(index, "sm_clock", nvml.nvmlDeviceGetClockInfo, h, nvml.NVML_CLOCK_SM)
            if clock is not None:
                values[prefix + "sm_clock_mhz"] = float(clock)
            bits = self._query(index, "throttle", self._throttle_reasons, h)
            if bits is not None:
                reasons[prefix] = int(bits)
        with self._lock:
            for name, value in values.items():
                self._sums[name] = self._sums.get(name, 0.0) + value
                self._counts[name] = self._counts.get(name, 0) + 1
            for prefix, bits in reasons.items():
                name = prefix + "throttle_reasons"
                self._ors[name] = self._ors.get(name, 0) | bits
                throttled = 1.0 if bits & ~idle_bit else 0.0  # any reason but idling
                self._maxes[prefix + "throttled"] = max(self._maxes.get(prefix + "throttled", 0.0), throttled)
        return len(values) + len(reasons)

    def window_means(self) -> dict[str, float]:
        """Means of the samples since the previous call (throttle reasons OR-ed, `throttled` max).

        Never raises (the training loop calls it at every flush): should the window be unreadable,
        one line says so and the window is empty.
        """
        with self._lock:
            sums, counts, ors, maxes = self._sums, self._counts, self._ors, self._maxes
            self._reset_window()
        try:
            out = {name: total / counts[name] for name, total in sums.items()}
            out.update({name: float(bits) for name, bits in ors.items()})
            out.update({name: float(value) for name, value in maxes.items()})
            return out
        except Exception as e:
            if not self._warned:
                self._warned = True
                _say(f"GPU stats of this window are unreadable ({_describe(e)}); left out, sampling goes on")
            return {}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s) and not self.stopped:
            self.sample()  # never raises

    def close(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5.0)
            self.thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


def cuda_memory_stats(device) -> dict[str, float]:
    """Allocator statistics for `device` in GiB; the peak is reset so each call reports its window.

    Host-side bookkeeping of the caching allocator: no device synchronisation. `{}` off CUDA.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return {}
    stats = {
        "system/mem_allocated_gb": torch.cuda.memory_allocated(device) / GiB,
        "system/mem_peak_gb": torch.cuda.max_memory_allocated(device) / GiB,
        "system/mem_reserved_gb": torch.cuda.memory_reserved(device) / GiB,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return stats


def host_rss_gb() -> float | None:
    """This process's resident memory in GiB, read from /proc (Linux), or None where there is none.
    A few microseconds, no device work: read at every flush, it shows a host-side leak as a slope."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / GiB
