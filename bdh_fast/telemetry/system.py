"""GPU health from NVML (sampled on a background thread) and CUDA allocator statistics.

Neither touches the device stream: NVML queries go to the driver, and the allocator numbers are
host-side bookkeeping, so reading them never synchronises with the training step.
"""

from __future__ import annotations

import os
import sys
import threading

GiB = float(2**30)  # the `_gb` metrics are GiB, as nvidia-smi and torch.cuda.memory_summary count


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
        self._reset_window()

    def _reset_window(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._ors: dict[str, int] = {}
        self._maxes: dict[str, float] = {}

    def start(self) -> GPUSampler:
        if self.interval_s <= 0 or self.thread is not None:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:  # no library, no driver, no GPU
            print(f"nvml: not available ({e or type(e).__name__}); GPU stats off", file=sys.stderr, flush=True)
            return self
        self._nvml = pynvml
        try:
            self._handles = self._resolve_handles()
        except Exception as e:
            self._handles = []
            reason = f"{type(e).__name__}: {e}"
        else:
            reason = "no visible GPUs"
        if not self._handles:
            print(f"nvml: not available ({reason}); GPU stats off", file=sys.stderr, flush=True)
            self.close()
            return self
        self.sample()  # a first sample now, so even a short first window has one
        self.thread = threading.Thread(target=self._run, name="bdh-gpu-sampler", daemon=True)
        self.thread.start()
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
        """One NVML query; None (metric omitted) when it fails. NotSupported is remembered."""
        if (index, metric) in self._unsupported:
            return None
        try:
            return fn(*args)
        except Exception as e:
            not_supported = getattr(self._nvml, "NVMLError_NotSupported", None)
            if not_supported is not None and isinstance(e, not_supported):
                self._unsupported.add((index, metric))
            return None

    def _throttle_reasons(self, handle):
        nvml = self._nvml
        fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if fn is None:  # older bindings
            fn = nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return fn(handle)

    def sample(self) -> None:
        """Query every GPU once and add the values to the current window."""
        nvml = self._nvml
        if nvml is None:
            return
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

    def window_means(self) -> dict[str, float]:
        """Means of the samples since the previous call (throttle reasons OR-ed, `throttled` max)."""
        with self._lock:
            out = {name: total / self._counts[name] for name, total in self._sums.items()}
            out.update({name: float(bits) for name, bits in self._ors.items()})
            out.update(self._maxes)
            self._reset_window()
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a sampler must never take the run down; skip this tick
                pass

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
