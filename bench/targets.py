"""The one table of benchmark targets, and the rule that turns a figure into a verdict.

Every benchmark script judges its figures against TARGETS (through bench/common.py), the GPU proof
takes its limits from here, and bench/run_all.py only reads the verdicts the scripts put in their
JSON records. Pure Python, no torch: the GPU proof's parent process imports it before the install.

Verdicts:
  GOAL        at or past the stretch goal, and the noise resolves it
  PASS        meets the target, and the noise resolves it
  FAIL        misses the target: every paired round misses it, or the median does and the noise
              is narrower than the target
  unresolved  some paired round meets the target and the paired range (per-round A/B ratios) is
              wider than the target itself: the noise hides whether the target is met, whatever
              the median says (never PASS or GOAL then)
  reported    a figure with no target in this setup (another device or preset than the target's)

A figure whose size is under the noise floor (half the paired range's spread) is reported as such:
"+0.11% (below the noise floor: +/-3.2%)".
"""

from __future__ import annotations

import dataclasses

GOAL, PASS, FAIL, UNRESOLVED, REPORTED = "GOAL", "PASS", "FAIL", "unresolved", "reported"


@dataclasses.dataclass(frozen=True)
class Target:
    """`figure` <op> `limit` (in `unit`); `goal` a stricter bar for GOAL; `where` the (device,
    preset) pairs the target is set for (empty: everywhere). A percentage target's noise (the
    paired range's width in points) is compared with the limit; a ratio target's ("x": a speedup)
    is relative, the range's spread hi/lo - 1 against the target's margin over parity (1.3x: 30%);
    a counted figure (noise=False) has none."""

    name: str
    bench: str  # the script's `bench` record field
    figure: str  # the record key holding the figure
    claim: str
    op: str  # "<=" or ">="
    limit: float
    unit: str  # "%", "x" or a unit of a counted figure ("launches")
    goal: float | None = None
    where: tuple[tuple[str, str], ...] = ()
    noise: bool = True  # False: a counted figure, no timing noise

    def applies(self, device: str | None, preset: str | None) -> bool:
        return not self.where or (device, preset) in self.where or (device, None) in self.where

    def text(self) -> str:
        unit = "" if self.unit == "x" else self.unit if self.unit == "%" else f" {self.unit}"
        spec = "g"
        bar = f"{self.op} {self.limit:{spec}}{'x' if self.unit == 'x' else unit}"
        if self.goal is not None:
            bar += f" (goal {self.goal:{spec}}{'x' if self.unit == 'x' else unit})"
        if self.where:
            bar += " on " + ", ".join(f"{d}{'' if p is None else ' ' + p}" for d, p in self.where)
        return bar


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("throughput", "throughput", "speedup", "compiled vs eager tokens/s", ">=", 1.3, "x",
           where=(("cpu", "small"),)),
    Target("overhead_cpu", "overhead", "full_overhead_pct", "full telemetry vs the bare loop", "<=", 3.0, "%",
           goal=1.0, where=(("cpu", "small"),)),
    Target("overhead_reference", "overhead", "full_overhead_pct", "full telemetry vs the bare loop", "<=", 1.0, "%",
           where=(("cuda", "reference"),)),
    Target("overhead_launch_bound", "overhead", "full_overhead_pct",
           "full telemetry vs the bare loop (launch-bound preset)", "<=", 5.0, "%", goal=1.0,
           where=(("cuda", "small"),)),
    Target("overhead_full", "overhead", "full_overhead_pct", "full telemetry vs the bare loop (the design card)", "<=",
           5.0, "%", goal=1.0),
    Target("overhead_row", "overhead_matrix", "overhead_pct", "each telemetry setting vs the bare loop", "<=", 5.0,
           "%", goal=1.0),
    Target("writer", "overhead", "writer_overhead_pct",
           "the Logger's writer vs a launch-bound thread (tiny ops, no Logger)", "<=", 2.0, "%"),
    Target("launches", "overhead", "telemetry_launches_per_step", "kernel launches the telemetry adds per step",
           "<=", 6.0, "launches", noise=False),
    Target("stats", "stats", "speedup_cpu", "fused tensor_stats vs the unfused torch ops, fp32 (at 10M)", ">=", 2.0,
           "x", where=(("cpu", None),)),
    Target("generate", "generate", "speedup", "cached decoding vs full recompute, 256 tokens", ">=", 5.0, "x",
           where=(("cpu", None),)),
    Target("histograms", "probes", "histogram_speedup", "tensor_stats + add_histogram_raw vs add_histogram",
           ">=", 10.0, "x", where=(("cpu", None),)),
    Target("eval_probes", "probes", "amortized_pct", "eval + samples + probes at the default cadences", "<=", 2.0,
           "%", where=(("cuda", "reference"),)),
    # Issue 16: every step's BDH neuron statistics from the training forward (full with vs without them).
    Target("neuron_stats", "overhead", "neuron_stats_overhead_pct", "every step's neuron statistics", "<=", 2.0,
           "%", where=(("cpu", "small"),)),
    Target("neuron_stats_reference", "overhead", "neuron_stats_overhead_pct", "every step's neuron statistics",
           "<=", 1.0, "%", where=(("cuda", "reference"),)),
    # Issue 17 (bench/peer.py): ours against our implementation of the reference's formulation.
    Target("peer_speedup", "peer", "speedup", "training tokens/s vs the reference formulation", ">=", 1.5, "x"),
    Target("peer_memory", "peer", "memory_ratio", "peak memory of a training step vs the reference formulation",
           "<=", 0.7, "x", noise=False),
    Target("peer_logits", "peer", "logits_max_abs_diff", "logits vs the reference formulation's, fp32 (max |diff|)",
           "<=", 1e-5, "abs diff", noise=False),
]}


def noise_margin(target: Target) -> float:
    """How wide a paired range may be (spread(), in %) before it hides the target."""
    if not target.noise:
        return float("inf")
    return abs(target.limit - 1.0) * 100 if target.unit == "x" else abs(target.limit)


def spread(paired: tuple[float, float] | list[float], unit: str) -> float:
    """The paired range's width: in points for percentages, relative (hi/lo - 1, in %) for ratios."""
    lo, hi = min(paired), max(paired)
    return (hi / lo - 1) * 100 if unit == "x" else hi - lo


def judge_value(value: float | None, target: Target, paired: tuple[float, float] | list[float] | None = None
                ) -> tuple[str, str]:
    """(verdict, note) for `value` against `target`, given the paired per-round range `paired`
    (same unit as value) when the figure is a timed A/B comparison."""
    if value is None:
        return REPORTED, "no figure"
    meets = (lambda v, bar: v <= bar) if target.op == "<=" else (lambda v, bar: v >= bar)
    note = ""
    if paired:
        lo, hi = min(paired), max(paired)
        width = spread(paired, target.unit)
        fmt = ".2f" if target.unit == "x" else "+.1f"
        note = f"paired range {lo:{fmt}}..{hi:{fmt}}{'x' if target.unit == 'x' else '%'}"
        best, worst = (lo, hi) if target.op == "<=" else (hi, lo)
        if not meets(best, target.limit):
            return FAIL, f"{note}: every round misses the target"
        if width > noise_margin(target):
            return UNRESOLVED, (f"{note} spreads {width:.0f}%, wider than the target's {noise_margin(target):g}% "
                                "margin" if target.unit == "x" else
                                f"{note} is wider than the target's {noise_margin(target):g}-point margin")
        if not meets(worst, target.limit):
            note += ": straddles the target, the median decides"
    if not meets(value, target.limit):
        return FAIL, note
    if target.goal is not None and meets(value, target.goal):
        if paired and spread(paired, target.unit) > noise_margin(dataclasses.replace(target, limit=target.goal)):
            return PASS, f"{note}; too noisy to resolve the goal".lstrip("; ")
        return GOAL, note
    return PASS, note


def describe(value: float | None, paired: tuple[float, float] | list[float] | None, spec: str = "+.2f",
             unit: str = "%") -> str:
    """The figure, and "(below the noise floor: +/-x%)" when its size (a ratio's: its distance from
    parity, in %) is under half the paired range's spread."""
    if value is None:
        return "n/a"
    text = f"{value:{spec}}{unit}"
    if paired:
        floor = spread(paired, unit) / 2
        size = abs(value - 1.0) * 100 if unit == "x" else abs(value)
        if size < floor:
            text += f" (below the noise floor: +/-{floor:.2g}%)"
    return text


def judge(name: str, value: float | None, *, device: str | None = None, preset: str | None = None,
          paired: tuple[float, float] | list[float] | None = None, quick: bool = False,
          figure: str | None = None) -> dict:
    """One verdict entry for a script's record: {target, claim, figure, value, paired_range, target_text,
    verdict, note}. Outside the target's (device, preset) the verdict is "reported"; in a --quick
    run it is computed but marked as no gate."""
    target = TARGETS[name]
    applies = target.applies(device, preset)
    verdict, note = judge_value(value, target, paired)
    if not applies and verdict != REPORTED:
        note = f"{verdict} against a target set for another setup; {note}".rstrip("; ")
        verdict = REPORTED
    if quick:
        note = ("quick run: harness check, no gate; " + note).rstrip("; ")
    unit = "x" if target.unit == "x" else "%" if target.unit == "%" else ""
    shown = figure or (describe(value, paired, ".2f" if unit == "x" else "+.2f", unit) if unit
                       else f"{value:g} {target.unit}" if value is not None else "n/a")
    return {"target": name, "claim": target.claim, "figure": shown, "value": value,
            "paired_range": list(paired) if paired else None, "target_text": target.text(), "verdict": verdict,
            "note": note, "quick": quick}


def failed(verdicts: list[dict]) -> list[dict]:
    """The entries that gate a run: FAIL outside --quick."""
    return [v for v in verdicts if v["verdict"] == FAIL and not v.get("quick")]
