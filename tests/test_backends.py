"""Logger fan-out and the TensorBoard / W&B / JSONL backends, checked by reading every file back.

W&B runs offline only (no server is ever contacted). Its `.wandb` transaction log is read back with
`wandb leet inspect --json`, which prints one JSON object per record; wandb 0.31 has no Python-level
reader (the old `wandb.sdk.internal.datastore` is gone).
"""

import contextlib
import glob
import io
import json
import math
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from bdh_fast.errors import UserError
from bdh_fast.logger import Logger
from bdh_fast.telemetry.backends import (
    Backend,
    Histogram,
    JsonlBackend,
    TensorBoardBackend,
    WandbBackend,
    Writer,
    parse_backends,
    wandb_api_key_configured,
)

CONFIG = {"model": {"n_layer": 2, "n_embd": 64}, "lr": 1e-3, "batch_size": 8, "compile": True,
          "dataset": "tiny", "betas": [0.9, 0.95], "seed": None}
N_STEPS = 30


def wandb_offline_env(mp, root):
    """Keep wandb offline and inside `root`: no server, no writes to the home directory."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        mp.delenv(name, raising=False)
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_CONSOLE", "off")
    mp.setenv("WANDB_DISABLE_GIT", "true")
    mp.setenv("NETRC", str(root / "no-netrc"))
    for name, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"),
                      ("WANDB_CONFIG_DIR", "config"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        mp.setenv(name, str(root / sub))


def metrics_at(step):
    metrics = {"train/loss": 4.0 / step, "train/lr": 1e-3 * step / N_STEPS, "perf/step_ms": 10.0 + step % 3,
               "train/grad_norm": float("nan") if step == 7 else 0.5 + step / 100}
    return metrics


def hist_at(step):
    return Histogram.from_counts(-1.0, 1.0, [1, 2, 3, step], 6 + step, 0.25 * step, 3.0 + step)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}")) for line in f]


def jsonl_metrics(records):
    """{(name, step): value} of the metric records (events left out)."""
    return {(k, r["step"]): v for r in records if "event" not in r for k, v in r.items() if k != "step"}


def same(a, b, rel=1e-6):
    """JSONL null stands for a non-finite value; TensorBoard gives NaN, the W&B log "NaN"."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or b == "NaN" or (isinstance(b, float) and math.isnan(b))
    return isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def load_tensorboard(run_dir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(run_dir, size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def wandb_records(run_file):
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_file],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One run through tensorboard + jsonl + wandb(offline, mode auto) via the public Logger."""
    root = tmp_path_factory.mktemp("full")
    run_dir = str(root / "run")
    checkpoint = root / "ckpt.pt"
    checkpoint.write_bytes(b"weights")
    with pytest.MonkeyPatch.context() as mp:
        wandb_offline_env(mp, root)
        mp.delenv("WANDB_MODE")  # let mode auto find no API key and choose offline itself
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            logger = Logger("tensorboard,jsonl,wandb", project_name="bdh-test", config=CONFIG, log_dir=run_dir,
                            wandb_entity=None, wandb_mode="auto", run_name="test-run", log_checkpoints=True)
            for step in range(1, N_STEPS + 1):
                logger.log_metrics(metrics_at(step), step)
                if step % 10 == 0:
                    logger.log_metrics({"val/loss": 5.0 / step, "val/perplexity": math.exp(5.0 / step)}, step)
                    logger.log_histogram("model/hist/w", hist_at(step), step)
                    logger.log_table("samples", ["step", "prompt", "sample"], [[step, "The", f"The cat {step}"]], step)
            logger.log_text("notes", "a | b\nsecond line", 5)
            logger.log_artifact(str(checkpoint), "ckpt step 30", "checkpoint")
            logger.finish()
    return {"run_dir": run_dir, "logger": logger, "stderr": stderr.getvalue(), "root": root}


def test_jsonl_is_valid_json_with_null_for_nan(full_run):
    records = read_jsonl(os.path.join(full_run["run_dir"], "metrics.jsonl"))
    values = jsonl_metrics(records)
    assert values[("train/grad_norm", 7)] is None
    assert {s for (_, s) in values} == set(range(1, N_STEPS + 1))
    assert values[("val/loss", 20)] == pytest.approx(0.25)
    events = [r for r in records if "event" in r]
    assert [(e["event"], e["name"], e["step"]) for e in events if e["event"] == "histogram"] == [
        ("histogram", "model/hist/w", s) for s in (10, 20, 30)]
    assert {"event": "text", "name": "notes", "text": "a | b\nsecond line", "step": 5} in events
    table = [e for e in events if e["event"] == "table"]
    assert table[0]["rows"] == [[10, "The", "The cat 10"]] and table[0]["columns"] == ["step", "prompt", "sample"]


def test_tensorboard_matches_jsonl(full_run):
    run_dir = full_run["run_dir"]
    expected = jsonl_metrics(read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
    acc = load_tensorboard(run_dir)
    got = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert same(value, got[key], rel=1e-6), key  # TensorBoard stores float32

    hists = acc.Histograms("model/hist/w")
    assert [h.step for h in hists] == [10, 20, 30]
    h = hists[0].histogram_value
    assert list(h.bucket) == [1, 2, 3, 10] and h.num == 16 and list(h.bucket_limit) == pytest.approx([-0.5, 0, 0.5, 1])

    tensors = acc.Tags()["tensors"]
    text = {tag: acc.Tensors(tag) for tag in tensors if tag.endswith("text_summary")}
    assert json.loads(text["config/text_summary"][0].tensor_proto.string_val[0].decode()
                      .removeprefix("```json\n").removesuffix("\n```")) == CONFIG
    assert "second line" in text["notes/text_summary"][0].tensor_proto.string_val[0].decode()
    assert [e.step for e in text["samples/text_summary"]] == [10, 20, 30]
    assert "The cat 10" in text["samples/text_summary"][0].tensor_proto.string_val[0].decode()

    # hparams live in this run, not in an add_hparams sub-run
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert [d for d in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, d))] == ["wandb"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    ssi = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert ssi.hparams["model.n_layer"].number_value == 2 and ssi.hparams["dataset"].string_value == "tiny"
    assert "betas" not in ssi.hparams and "seed" not in ssi.hparams

    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert {"^train/loss$", "^val/loss$", "^train/loss_eval$"} <= set(charts["loss"])
    assert "^perf/step_ms$" in charts["step time (ms)"]


def test_wandb_offline_run_matches_jsonl(full_run):
    run_dir = full_run["run_dir"]
    assert full_run["stderr"].count("wandb sync") == 1  # mode auto without a key: offline + one hint
    run_id = open(os.path.join(run_dir, "wandb_id.txt")).read().strip()
    (run_file,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", f"run-{run_id}.wandb"))
    records = wandb_records(run_file)

    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["run_id"] == run_id and run["project"] == "bdh-test" and run["config"]["update"]["lr"] == 1e-3
    metric_defs = [r["metric"] for r in records if r["type"] == "metric"]
    assert {"glob_name": "*", "step_metric": "step"} .items() <= next(m for m in metric_defs if m.get("glob_name")).items()

    expected = jsonl_metrics(read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
    got, hists, tables = {}, {}, []
    for r in records:
        if r["type"] != "history":
            continue
        item = r["history"]["item"]
        step = item["step"]
        for key, value in item.items():
            if key.startswith("model/hist/w."):
                hists.setdefault(step, {})[key.split(".")[-1]] = value
            elif key.startswith(("samples.", "notes.")):
                tables.append((step, key, value))
            elif not key.startswith("_") and key != "step":
                assert (key, step) not in got, f"{key} twice at step {step}"
                got[(key, step)] = value
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert same(value, got[key], rel=1e-12), key

    assert sorted(hists) == [10, 20, 30]
    counts, edges = hist_at(10).to_numpy_histogram()
    assert hists[10]["values"] == counts and hists[10]["bins"] == pytest.approx(edges)
    # the samples table grows by one row per call; each increment file holds the new rows
    assert {step: v for step, key, v in tables if key == "samples.nrows"} == {10: 1, 20: 2, 30: 3}
    assert {v for _, key, v in tables if key == "samples.log_mode"} == {"INCREMENTAL"}
    last = next(v for step, key, v in tables if key == "samples.path" and step == 30)
    with open(os.path.join(os.path.dirname(run_file), "files", last)) as f:
        assert [30, "The", "The cat 30"] in json.load(f)["data"]
    assert {v for _, key, v in tables if key == "notes.nrows"} == {1}
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert any(a["type"] == "checkpoint" and a["name"] == "ckpt-step-30" for a in artifacts)


def test_wandb_resume_reuses_run_id(full_run, tmp_path, monkeypatch):
    wandb_offline_env(monkeypatch, tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first_id = open(os.path.join(full_run["run_dir"], "wandb_id.txt")).read().strip()
    (run_dir / "wandb_id.txt").write_text(first_id + "\n")  # as the first start left it
    backend = WandbBackend(str(run_dir), CONFIG, project="bdh-test", mode="offline", resume_step=31)
    assert backend.run.id == first_id
    backend.log_metrics({"train/loss": 0.1}, 31)
    backend.finish()
    (run_file,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{first_id}.wandb"))
    history = [r["history"]["item"] for r in wandb_records(run_file) if r["type"] == "history"]
    assert [(h["step"], h["train/loss"]) for h in history] == [(31, 0.1)]


def test_wandb_resume_logs_every_step_exactly_once(tmp_path, monkeypatch):
    """Segment 1 gave W&B steps 1-4 and 6-10 (step 5 lost when the process died) and JSONL steps
    1-10; its checkpoint is at step 8. The resumed segment recomputes 9-12: W&B must end with every
    step once (5 backfilled from metrics.jsonl, 9-10 not logged twice), across both segments."""
    from bdh_fast.telemetry.backends import wandb_history

    wandb_offline_env(monkeypatch, tmp_path)
    run_dir = str(tmp_path / "run")
    first = WandbBackend(run_dir, CONFIG, project="bdh-test", mode="offline")
    jsonl = JsonlBackend(run_dir)
    for step in range(1, 11):
        jsonl.log_metrics({"train/loss": 1.0 / step}, step)
        if step != 5:
            first.log_metrics({"train/loss": 1.0 / step}, step)
        if step % 4 == 0:
            jsonl.log_table("samples", ["step", "text"], [[step, f"s{step}"]], step)
            if step != 4:
                first.log_table("samples", ["step", "text"], [[step, f"s{step}"]], step)
    first.finish()
    jsonl.finish()

    second = WandbBackend(run_dir, CONFIG, project="bdh-test", mode="offline", resume_step=9)
    jsonl = JsonlBackend(run_dir, 9)
    for step in range(9, 13):
        second.log_metrics({"train/loss": 1.0 / step}, step)
        jsonl.log_metrics({"train/loss": 1.0 / step}, step)
    second.log_table("samples", ["step", "text"], [[12, "s12"]], 12)
    second.finish()
    jsonl.finish()

    run_id = second.run.id
    logs = wandb_history.transaction_logs(run_dir, run_id)
    assert len(logs) == 2
    rows = [item for log in logs for item in wandb_history.history_items(log)]
    losses = sorted((r["step"], r["train/loss"]) for r in rows if "train/loss" in r)
    assert losses == [(s, pytest.approx(1.0 / s)) for s in range(1, 13)]
    assert sorted(r["step"] for r in rows if "samples.nrows" in r) == [4, 8, 12]


class Recorder(Backend):
    def __init__(self, name):
        self.name = name
        self.calls = []
        self.finished = False

    def log_metrics(self, metrics, step):
        self.calls.append(("metrics", step, metrics))

    def log_text(self, name, text, step):
        self.calls.append(("text", step, text))

    def log_histogram(self, name, hist, step):
        self.calls.append(("histogram", step, hist))

    def log_artifact(self, path, name, kind):
        self.calls.append(("artifact", path))

    def finish(self):
        self.finished = True


class Flaky(Recorder):
    """Raises on its third log call."""

    def log_metrics(self, metrics, step):
        if len(self.calls) == 2:
            raise RuntimeError("disk on fire")
        super().log_metrics(metrics, step)


class Slow(Recorder):
    delay = 0.2

    def log_metrics(self, metrics, step):
        time.sleep(self.delay)
        super().log_metrics(metrics, step)


def feed(logger):
    for step in range(1, 6):
        logger.log_metrics({"train/loss": float(step)}, step)
    logger.log_text("sample", "hi", 5)
    logger.log_table("samples", ["step", "prompt", "sample"], [[5, "a", "ab"], [5, "b", "bc"]], 5)
    logger.log_histogram("h", hist_at(5), 5)
    logger.log_artifact("/x", "ckpt", "checkpoint")
    return 5 + 1 + 2 + 1 + 1  # the default log_table gives one log_text per row


def test_failing_backend_is_dropped_with_one_warning(capsys):
    first, flaky, last = Recorder("first"), Flaky("flaky"), Recorder("last")
    logger = Writer([first, flaky, last])
    n = feed(logger)
    assert logger.flush(timeout=10)
    logger.finish()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flaky" in err[0] and "RuntimeError: disk on fire" in err[0]
    assert logger.failed == ["flaky"]
    assert len(first.calls) == n and first.calls == last.calls and first.finished and last.finished
    assert len(flaky.calls) == 2
    assert not logger._thread.is_alive()
    logger.finish()  # idempotent
    logger.log_metrics({"train/loss": 1.0}, 99)  # after finish: ignored, no error
    assert len(first.calls) == n


def test_backend_failing_in_finish_is_warned_and_others_finish(capsys):
    class BadFinish(Recorder):
        def finish(self):
            raise OSError("cannot close")

    good, bad = Recorder("good"), BadFinish("bad")
    logger = Writer([bad, good])
    logger.log_metrics({"a/b": 1.0}, 1)
    logger.finish()
    assert good.finished and good.calls == bad.calls == [("metrics", 1, {"a/b": 1.0})]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad" in err[0] and "cannot close" in err[0]


def test_logging_never_blocks_and_flush_waits():
    slow = Slow("slow")
    logger = Writer([slow])
    start = time.perf_counter()
    for step in range(50):
        logger.log_metrics({"train/loss": float(step)}, step)
    assert time.perf_counter() - start < 0.1
    assert len(slow.calls) < 50
    assert logger.flush(timeout=0.05) is False  # still writing
    slow.delay = 0.0  # let the writer catch up quickly
    assert logger.flush() is True
    assert [c[1] for c in slow.calls] == list(range(50))
    logger.finish()


class Stalled(Recorder):
    """log_metrics blocks until `release` is set: a hung network or disk."""

    def __init__(self, name):
        super().__init__(name)
        self.entered, self.release = threading.Event(), threading.Event()

    def log_metrics(self, metrics, step):
        self.entered.set()
        self.release.wait(60)
        super().log_metrics(metrics, step)


def test_stalled_backend_costs_bounded_memory_then_records_are_dropped_and_counted(capsys):
    stalled, healthy = Stalled("stalled"), Recorder("healthy")
    bound = 100
    logger = Writer([healthy, stalled], max_queued_values=bound)
    logger.log_metrics({"train/loss": 0.0}, 0)
    assert stalled.entered.wait(10)  # the writer is now stuck inside the stalled backend
    peak, start = 0, time.perf_counter()
    for step in range(1, 5001):
        logger.log_metrics({"train/loss": float(step), "train/lr": 1e-3}, step)
        peak = max(peak, logger.queued_values, logger._queue.qsize())
    assert time.perf_counter() - start < 2.0  # the training thread never waited for the writer
    assert 0 < peak <= bound
    assert 4900 < logger.dropped < 5000
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "logging backend stalled (in log_metrics)" in err[0] and "dropped" in err[0]

    stalled.release.set()
    assert logger.finish(timeout=30) is True
    err = capsys.readouterr().err.strip().splitlines()
    kept = 5001 - logger.dropped
    assert err == [f"warning: {logger.dropped:,} logging records (steps {kept} to 5000) were dropped because "
                   f"a backend fell more than {bound:,} values behind"]
    # what was kept reached both backends, in order and without a gap; the rest is dropped whole
    assert [c[1] for c in healthy.calls] == [c[1] for c in stalled.calls] == list(range(kept))
    assert logger.queued_values == 0


def test_a_record_larger_than_the_bound_still_goes_through_an_empty_queue():
    rec = Recorder("rec")
    logger = Writer([rec], max_queued_values=10)
    logger.log_histogram("h", Histogram.from_counts(0.0, 1.0, [1.0] * 64, 64, 32.0, 21.0), 1)
    logger.finish()
    assert [c[0] for c in rec.calls] == ["histogram"] and logger.dropped == 0


def test_finish_gives_up_on_a_backend_that_does_not_finish_and_names_it(capsys):
    class Hangs(Recorder):
        release = threading.Event()

        def finish(self):
            self.release.wait(60)
            self.finished = True

    good, hangs = Recorder("good"), Hangs("hangs")
    logger = Writer([good, hangs], finish_timeout_s=0.3)
    logger.log_metrics({"a/b": 1.0}, 1)
    start = time.perf_counter()
    assert logger.finish() is False  # the default timeout is the Logger's finish_timeout_s
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "logging backend hangs (in finish) did not finish within 0.3 s" in err[0]
    assert good.finished and good.calls == hangs.calls == [("metrics", 1, {"a/b": 1.0})]
    logger.log_metrics({"a/b": 2.0}, 2)  # after finish: ignored, never blocks
    Hangs.release.set()
    logger._thread.join(10)
    assert not logger._thread.is_alive() and hangs.finished
    assert logger.finish() is True  # a second call: nothing more to wait for, no second warning
    assert capsys.readouterr().err == ""


def test_flush_without_a_timeout_is_bounded_too():
    stalled = Stalled("stalled")
    logger = Writer([stalled], finish_timeout_s=0.2)
    logger.log_metrics({"a/b": 1.0}, 1)
    assert stalled.entered.wait(10)
    start = time.perf_counter()
    assert logger.flush() is False  # the default timeout is the Logger's finish_timeout_s
    assert 0.2 <= time.perf_counter() - start < 5
    stalled.release.set()
    assert logger.flush(timeout=10) is True
    assert stalled.calls == [("metrics", 1, {"a/b": 1.0})]
    logger.finish()


def test_caller_may_reuse_its_dict():
    rec = Recorder("rec")
    logger = Writer([rec])
    row = {"train/loss": 1.0}
    logger.log_metrics(row, 1)
    row["train/loss"] = 2.0
    logger.finish()
    assert rec.calls == [("metrics", 1, {"train/loss": 1.0})]


def write_steps(run_dir, steps, resume_step=None, value=1.0):
    backend = JsonlBackend(run_dir, resume_step)
    for step in steps:
        backend.log_metrics({"train/loss": value * step}, step)
        if step % 5 == 0:
            backend.log_text("sample", f"at {step}", step)
    backend.finish()


def test_jsonl_resume_drops_later_steps_and_half_line(tmp_path):
    run_dir = str(tmp_path)
    path = os.path.join(run_dir, "metrics.jsonl")
    write_steps(run_dir, range(1, 21))
    with open(path, "a") as f:
        f.write('{"step": 21, "train/lo')  # a crash mid-write
    JsonlBackend(run_dir, resume_step=11).finish()
    assert [r["step"] for r in read_jsonl(path) if "event" not in r] == list(range(1, 11))
    assert not os.path.exists(path + ".tmp")
    write_steps(run_dir, range(11, 21), resume_step=11, value=2.0)
    records = read_jsonl(path)
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 21))
    assert [r["text"] for r in records if r.get("event") == "text"] == ["at 5", "at 10", "at 15", "at 20"]
    assert jsonl_metrics(records)[("train/loss", 15)] == 30.0


def test_jsonl_append_after_crash_without_resume_starts_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a/b": 1.0}\n{"step": 2, "a/b"')
    write_steps(str(tmp_path), [3])
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1]) == {"step": 3, "train/loss": 3.0}


def test_tensorboard_resume_purges_repeated_steps(tmp_path):
    run_dir = str(tmp_path)
    for resume_step, steps, value in ((None, range(1, 21), 1.0), (11, range(11, 21), 2.0)):
        backend = TensorBoardBackend(run_dir, {"lr": 0.1}, resume_step)
        for step in steps:
            backend.log_metrics({"train/loss": value * step}, step)
        backend.finish()
    events = load_tensorboard(run_dir).Scalars("train/loss")
    assert [e.step for e in events] == list(range(1, 21))
    assert [e.value for e in events] == [float(s) for s in range(1, 11)] + [2.0 * s for s in range(11, 21)]


def test_histogram_from_counts_and_numpy_form():
    h = Histogram.from_counts(0.0, 4.0, [1, 0, 2, 1], 4, 7.0, 15.0)
    assert h.bucket_limits == [1.0, 2.0, 3.0, 4.0] and h.bucket_counts == [1.0, 0.0, 2.0, 1.0]
    assert h.to_numpy_histogram() == ([1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    flat = Histogram.from_counts(3.0, 3.0, [5], 5, 15.0, 45.0)  # all values equal
    counts, edges = flat.to_numpy_histogram()
    assert counts == [5.0] and len(edges) == 2 and edges[0] < edges[1]


def test_histogram_merges_buckets_for_wandb_limit():
    h = Histogram.from_counts(0.0, 10.0, [1.0] * 10, 10, 50.0, 330.0)
    counts, edges = h.to_numpy_histogram(max_bins=4)  # groups of 3: 3 + 3 + 3 + 1 buckets
    assert counts == [3.0, 3.0, 3.0, 1.0] and edges == pytest.approx([0.0, 3.0, 6.0, 9.0, 10.0])


def test_logger_flush_makes_tensorboard_events_readable(tmp_path):
    logger = Writer([TensorBoardBackend(str(tmp_path), {}, None)])
    logger.log_metrics({"train/loss": 1.5}, 3)
    assert logger.flush(timeout=10)
    assert [(e.step, e.value) for e in load_tensorboard(str(tmp_path)).Scalars("train/loss")] == [(3, 1.5)]
    logger.finish()


def test_wandb_api_key_check_is_local(tmp_path, monkeypatch):
    wandb_offline_env(monkeypatch, tmp_path)
    assert wandb_api_key_configured() is False
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_api_key_configured() is True
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_api_key_configured() is True


def test_parse_backends():
    assert parse_backends("tensorboard,jsonl") == ["tensorboard", "jsonl"]
    assert parse_backends(" TensorBoard , jsonl,tensorboard") == ["tensorboard", "jsonl"]
    assert parse_backends("none") == ["none"]
    for bad in ("tensorbored", "none,jsonl", "", " , "):
        with pytest.raises(UserError) as err:
            parse_backends(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="tensorboard, wandb, jsonl, none"):
        parse_backends("jsonl,wandbb")


def test_logger_none_and_unknown(tmp_path):
    logger = Logger("none", config=CONFIG, log_dir=str(tmp_path))
    assert logger.backends == [] and logger._thread is None
    logger.log_metrics({"train/loss": 1.0}, 1)
    assert logger.flush() is True
    logger.finish()
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match="choose from"):
        Logger("tensorboard,csv", config=CONFIG, log_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name == "nt", reason="directories cannot be fsynced on Windows")
def test_wandb_id_and_jsonl_truncation_are_durable(tmp_path, monkeypatch):
    """The file is fsynced before os.replace and its directory after: a power loss leaves the old
    file or the new one, never an empty one."""
    wandb_offline_env(monkeypatch, tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def assert_durable(path):
        ino, dir_ino = os.stat(path).st_ino, os.stat(os.path.dirname(path)).st_ino
        expected = [("fsync", "file", ino), ("replace", ino, path), ("fsync", "dir", dir_ino)]
        assert [e for e in events if e in expected] == expected, events

    run_dir = str(tmp_path / "run")
    WandbBackend(run_dir, CONFIG, project="bdh-test", mode="disabled").finish()
    assert_durable(os.path.join(run_dir, "wandb_id.txt"))
    events.clear()
    write_steps(run_dir, range(1, 6))
    JsonlBackend(run_dir, resume_step=3).finish()
    assert_durable(os.path.join(run_dir, "metrics.jsonl"))


def test_logger_flush_makes_jsonl_durable_before_a_checkpoint(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    logger = Writer([JsonlBackend(str(tmp_path)), Recorder("plain")])  # a backend without sync: flush
    logger.log_metrics({"train/loss": 1.0}, 1)
    assert logger.flush(timeout=10)
    path = tmp_path / "metrics.jsonl"
    assert synced == [path.stat().st_ino]  # once, at the flush the train loop makes before a checkpoint
    assert read_jsonl(path) == [{"step": 1, "train/loss": 1.0}]
    logger.finish()
    assert logger.failed == []


def test_wandb_disabled_mode_writes_nothing(tmp_path, monkeypatch):
    wandb_offline_env(monkeypatch, tmp_path)
    logger = Logger("wandb", config=CONFIG, log_dir=str(tmp_path / "run"), wandb_mode="disabled")
    logger.log_metrics({"train/loss": 1.0}, 1)
    logger.log_histogram("h", hist_at(1), 1)
    logger.finish()
    assert logger.failed == []
    assert not os.path.exists(tmp_path / "run" / "wandb")


KILLED_WRITER = """
import sys, time
from bdh_fast.telemetry.backends.wandb import WandbBackend
backend = WandbBackend(sys.argv[1], {}, project="bdh-test", mode="offline",
                       resume_step=None if sys.argv[2] == "-" else int(sys.argv[2]))
backend.log_metrics({"train/loss": 1.0 / int(sys.argv[3])}, int(sys.argv[3]))
print("logged", flush=True)
if sys.argv[4] == "hang":
    time.sleep(300)
backend.finish()
"""


def test_wandb_resume_after_kill_9_under_a_shared_service(tmp_path, monkeypatch):
    """A launcher that used wandb itself (a sweep agent, a script, pytest) leaves WANDB_SERVICE in its
    children's environment: they all log through its wandb-core. When a child is killed with -9, that
    service keeps the run's stream and answers "run ID ... is in use" to the resumed child; W&B must
    still start (through a service of the child's own), not be switched off."""
    wandb_offline_env(monkeypatch, tmp_path)
    import wandb

    launcher = wandb.init(project="bdh-test", dir=str(tmp_path), mode="offline")  # leaves WANDB_SERVICE set
    launcher.finish()
    assert os.environ.get("WANDB_SERVICE")
    run_dir = str(tmp_path / "run")
    child = [sys.executable, "-c", KILLED_WRITER, run_dir]
    killed = subprocess.Popen(child + ["-", "1", "hang"], stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().strip() == "logged"
    finally:
        killed.kill()
        killed.wait()
    resumed = subprocess.run(child + ["2", "2", "end"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "is still held in the shared wandb-core service" in resumed.stderr
    run_id = open(os.path.join(run_dir, "wandb_id.txt")).read().strip()
    steps = [r["history"]["item"]["step"]
             for run_file in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", f"run-{run_id}.wandb")))
             for r in wandb_records(run_file) if r["type"] == "history"]
    # Step 1 may be lost with the killed child (a real run backfills it from metrics.jsonl); step 2 is there once.
    assert steps.count(2) == 1 and set(steps) <= {1, 2}, steps
