"""End to end: two short real runs, served by an in-process TensorBoard and compared by
`python -m bdh_fast.compare` (table, JSON, plot, live/crashed runs, errors)."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from bdh_fast import compare, train
from bdh_fast.data import DEFAULT_CORPUS

STEPS = 12
LRS = {"a": "1e-3", "b": "3e-3"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two finished tiny runs, a and b, that differ only in --lr."""
    corpus = DEFAULT_CORPUS
    out = tmp_path_factory.mktemp("runs")
    for name, lr in LRS.items():
        argv = ["--preset", "tiny", "--no-compile", "--max_iters", str(STEPS), "--eval_freq", "6",
                "--eval_iters", "2", "--probe_freq", "6", "--generate_freq", "6", "--sample_tokens", "8",
                "--metrics", "full", "--no_progress", "--nvml_interval", "0", "--data", str(corpus), "--out_dir", str(out),
                "--run_name", name, "--lr", lr]
        assert train.main(argv) == 0
    return out


def compare_json(capsys, *argv: str) -> list[dict]:
    assert compare.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.filterwarnings("ignore:html5lib's sanitizer is deprecated:DeprecationWarning")
def test_tensorboard_serves_scalars_histograms_and_text_of_both_runs(runs):
    from tensorboard import program

    tb = program.TensorBoard()
    tb.configure(argv=[None, "--logdir", str(runs), "--host", "127.0.0.1", "--port", "0",
                       "--reload_interval", "1", "--load_fast", "false"])
    url = tb.launch().rstrip("/")

    def get(route: str, **query: str):
        with urllib.request.urlopen(f"{url}/data/{route}?{urllib.parse.urlencode(query)}", timeout=10) as r:
            return json.loads(r.read())

    def loaded() -> bool:  # the first reload may still be reading the event files
        if sorted(get("runs")) != ["a", "b"]:
            return False
        return all(len(get("plugin/scalars/scalars", run=run, tag="train/loss")) == STEPS
                   and len(get("plugin/scalars/scalars", run=run, tag="val/loss")) == 2 for run in LRS)

    deadline = time.monotonic() + 60
    while not loaded():
        assert time.monotonic() < deadline, "TensorBoard did not load both runs within 60 s"
        time.sleep(0.5)

    for run in LRS:
        train_loss = get("plugin/scalars/scalars", run=run, tag="train/loss")  # [[wall_time, step, value]]
        assert [step for _, step, _ in train_loss] == list(range(1, STEPS + 1))
        assert all(math.isfinite(value) for _, _, value in train_loss)
        assert [step for _, step, _ in get("plugin/scalars/scalars", run=run, tag="val/loss")] == [6, 12]
        histograms = get("plugin/histograms/histograms", run=run, tag="model/weights/encoder")
        assert [step for _, step, _ in histograms] == [6, 12] and histograms[0][2]  # buckets
    assert "model/weights/encoder" in get("plugin/histograms/tags")["a"]
    text_tags = get("plugin/text/tags")
    assert "samples/text_summary" in text_tags["a"] and "config/text_summary" in text_tags["b"]
    samples = get("plugin/text/text", run="a", tag="samples/text_summary")
    assert [s["step"] for s in samples] == [6, 12] and "To be or not to be" in samples[0]["text"]


def test_compare_table_shows_the_differing_field_and_json_every_column(runs, capsys):
    assert compare.main([str(runs)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "lr", *compare.COLUMNS]  # lr is the only field that differs
    assert sorted(row.split()[0] for row in rows) == ["a", "b"]

    table = {r["run"]: r for r in compare_json(capsys, str(runs / "a"), str(runs / "b"))}
    for name, lr in LRS.items():
        r = table[name]
        assert r["differs"] == {"lr": float(lr)} and r["config"]["preset"] == "tiny"
        assert r["steps"] == STEPS and r["tok_per_s"] > 0 and r["mfu"] is None  # no MFU on CPU
        assert r["best_val_loss"] <= r["final_val_loss"] and math.isfinite(r["train_loss"])
        assert r["val_ppl"] == pytest.approx(math.exp(r["final_val_loss"]), rel=1e-4)
        assert 0 < r["sparsity_x"] < 1 and r["wall_s"] >= 0
        assert 0 <= r["valid_words"] <= 1  # the last samples' share of words found in the training text

    ordered = compare_json(capsys, str(runs))
    assert ordered[0]["best_val_loss"] <= ordered[1]["best_val_loss"]  # default: best val loss first
    assert [r["run"] for r in compare_json(capsys, str(runs), "--sort", "lr", "--reverse")] == ["b", "a"]
    assert [r["run"] for r in compare_json(capsys, str(runs), "--filter", "lr=0.003")] == ["b"]
    assert [r["run"] for r in compare_json(capsys, str(runs), "--filter", "preset=tiny",
                                           "--filter", "lr=1e-3")] == ["a"]


def test_plot_writes_a_png(runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert compare.main([str(runs), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_live_and_crashed_runs_read(runs, tmp_path, capsys):
    crashed = tmp_path / "crashed"
    shutil.copytree(runs / "a", crashed)
    with open(crashed / "metrics.jsonl", "a") as f:  # a non-finite step, then a cut-off line
        f.write('{"step": 13, "train/loss": null, "val/loss": null}\n{"step": 14, "train/lo')
    starting = tmp_path / "starting"  # config written, no metric yet
    starting.mkdir()
    shutil.copy(runs / "b" / "config.json", starting)

    by_name = {r["run"]: r for r in compare_json(capsys, str(tmp_path))}
    assert by_name["crashed"]["steps"] == 13 and by_name["crashed"]["train_loss"] is None
    assert by_name["crashed"]["final_val_loss"] is None and by_name["crashed"]["best_val_loss"] > 0
    assert by_name["starting"]["steps"] is None
    assert compare.main([str(tmp_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(rows) == ["crashed", "starting"]  # missing best val loss sorts last
    assert "nan" in rows["crashed"]


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing"], "no such file or directory"),
    (["{tmp}"], "no runs found"),
    (["{runs}", "--filter", "lr"], "FIELD=VALUE"),
    (["{runs}", "--filter", "nope=1"], "no run has a config field"),
    (["{runs}", "--filter", "lr=5"], "no run matches"),
    (["{runs}", "--sort", "nope"], "not a column"),
])
def test_bad_input_is_one_line_and_status_2(runs, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, runs=runs) for a in argv]
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_plot_without_matplotlib_says_how_to_install(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert compare.main([str(runs), "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err

