"""What every backend shares: the `Backend` interface the writer calls, and `Histogram`, a histogram
already reduced to buckets (on the device, by `tensor_stats`), which is all a backend ever receives
of a tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from bdh_fast.ops import STATS_FIELDS


@dataclass
class Histogram:
    """A histogram in the form SummaryWriter.add_histogram_raw takes: buckets by their right edges."""

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: list[float]  # right edge of each bucket
    bucket_counts: list[float]

    @classmethod
    def from_counts(cls, lo, hi, counts, num, sum, sum_squares) -> Histogram:
        """Equal-width buckets over [lo, hi] (e.g. from torch.histc); `counts` may be a CPU tensor."""
        counts = [float(c) for c in (counts.tolist() if hasattr(counts, "tolist") else counts)]
        lo, hi = float(lo), float(hi)
        # all values equal: give the buckets a width so the edges still increase
        left, right = (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
        width = (right - left) / len(counts)
        limits = [left + (i + 1) * width for i in range(len(counts))]
        limits[-1] = right  # no rounding drift on the last edge
        return cls(lo, hi, float(num), float(sum), float(sum_squares), limits, counts)

    @classmethod
    def from_stats(cls, stats: Sequence[float], counts: Sequence[float]) -> Histogram:
        """From the host values of one `tensor_stats(x, bins)`: `stats` in STATS_FIELDS order and the
        bucket counts. NaN and Inf are in neither the buckets nor `num` (tensor_stats leaves them out)."""
        s = dict(zip(STATS_FIELDS, stats))
        return cls.from_counts(s["min"], s["max"], counts, num=sum(counts), sum=s["sum"], sum_squares=s["sum_sq"])

    def to_numpy_histogram(self, max_bins: int | None = None) -> tuple[list[float], list[float]]:
        """(counts, edges) with len(edges) == len(counts) + 1, as wandb.Histogram(np_histogram=...)
        takes; with `max_bins`, neighbouring buckets are merged until at most that many remain."""
        limits, counts = self.bucket_limits, self.bucket_counts
        if self.min < limits[0]:
            first = self.min
        else:  # the left edge of the first bucket is not recorded: mirror the next bucket's width
            first = limits[0] - ((limits[1] - limits[0]) if len(limits) > 1 else 1.0)
        if max_bins is not None and len(counts) > max_bins:
            group = -(-len(counts) // max_bins)
            counts = [sum(counts[i : i + group]) for i in range(0, len(counts), group)]
            limits = [limits[min(i + group, len(limits)) - 1] for i in range(0, len(limits), group)]
        return list(counts), [first, *limits]


class Backend:
    """One place metrics go. Every method is called from the writer's thread only."""

    name = "backend"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_text(self, name: str, text: str, step: int) -> None:
        raise NotImplementedError

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        for row in rows:
            self.log_text(name, "\n".join(f"{c}: {v}" for c, v in zip(columns, row)), step)

    def log_histogram(self, name: str, hist: Histogram, step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: str, name: str, kind: str) -> None:
        pass

    def log_alert(self, title: str, text: str, step: int) -> None:
        """Something a person should look at now (a loss spike). Default: the run's text."""
        self.log_text(f"alerts/{title}", text, step)

    def flush(self) -> None:
        """Called whenever the writer's queue runs empty: push buffered writes to disk."""

    def sync(self) -> None:
        """Called at `Writer.flush()`, before a checkpoint: make everything written so far durable
        (a checkpoint at step s claims every record up to s, DESIGN.md invariant 8)."""
        self.flush()

    def finish(self) -> None:
        pass
