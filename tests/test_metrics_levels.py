"""--metrics {basic,standard,full} (issue 16, item 5): what each level logs, as the README's table
says it. Each level logs everything the one before it does."""

from __future__ import annotations

import json

import pytest

from bdh_fast import train

from test_train import _fails_with_one_line, tiny_args

STEPS = 10


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("levels")
    keys, histograms = {}, {}
    for level in ("basic", "standard", "full"):
        assert train.main(tiny_args(corpus, out, level, "--metrics", level, "--max_iters", str(STEPS),
                                    "--probe_freq", "5", "--eval_freq", "10", "--generate_freq", "10",
                                    "--sample_tokens", "20")) == 0
        records = [json.loads(line) for line in (out / level / "metrics.jsonl").read_text().splitlines()]
        keys[level] = {k for r in records if "event" not in r for k in r}
        histograms[level] = {r["name"] for r in records if r.get("event") == "histogram"}
    return keys, histograms


def test_basic_is_the_run_at_a_glance(runs):
    keys, histograms = runs
    basic = keys["basic"]
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/step_ms", "perf/tokens_per_sec", "val/loss",
            "val/bpb", "samples/rep_4", "samples/valid_word_rate", "system/host_rss_gb"} <= basic
    assert not [k for k in basic if k.startswith(("train/grad_norm/", "train/sparsity/", "train/active_mean/",
                                                  "model/"))]
    assert not [k for k in basic if k.startswith("samples/") and "/p" in k]  # per-prompt figures
    assert not histograms["basic"]


def test_standard_adds_groups_neurons_and_probes_but_no_histograms(runs):
    keys, histograms = runs
    standard = keys["standard"]
    assert keys["basic"] <= standard
    assert {"train/grad_norm/group_neurons", "train/grad_norm/group_embeddings", "train/sparsity/xy/layer1",
            "train/active_mean/y/layer0", "model/param_norm/encoder", "model/update_ratio/decoder",
            "model/sparsity/x/layer0", "model/dead/y/layer1", "samples/rep_4/p0"} <= standard
    assert "train/grad_norm/encoder" not in standard  # per-parameter norms: full
    assert not histograms["standard"]


def test_full_adds_per_parameter_norms_and_histograms(runs):
    keys, histograms = runs
    assert keys["standard"] <= keys["full"]
    assert {"train/grad_norm/encoder", "train/grad_norm/lm_head", "train/grad_norm/embed"} <= keys["full"]
    assert {"model/weights/encoder", "model/grads/decoder"} <= histograms["full"]


def test_an_unknown_level_is_one_line_and_status_2(corpus, tmp_path, capsys):
    line = _fails_with_one_line(tiny_args(corpus, tmp_path, "x", "--metrics", "everything"), capsys)
    assert "--metrics" in line and "basic" in line
