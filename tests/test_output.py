"""What a run prints: progress when a step starts, a noisy device said once per run with its figure,
one budget figure everywhere, the chosen plan in `run`'s summary, the scatter plot's rounds and
their search budgets, and `predict --check N` counting N plans."""

from __future__ import annotations

import io
import json
import re
import shutil
import sqlite3
from types import SimpleNamespace

import pytest
import torch
import yaml

from edgeprune.latency.measurement import Measurement, Protocol

from .conftest import ROOT

SHIPPED_TABLE = ROOT / "latency_tables" / "cpu-onnxruntime" / "resnet20.json"


def test_a_step_s_progress_is_said_when_it_starts_and_its_end_once():
    from edgeprune.progress import PlainProgress

    stream = io.StringIO()
    with PlainProgress(stream, every_s=3600) as bar:
        task = bar.add_task("search bocr", total=4, status="")
        assert stream.getvalue().splitlines() == ["search bocr: 0/4  [0s]"]  # before its first update
        bar.update(task, completed=4, status="best 50.00%")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("search bocr: 4/4 best 50.00%")
    stream = io.StringIO()
    with PlainProgress(stream, every_s=0) as bar:  # its last update printed: the end is not said again
        bar.update(bar.add_task("measuring", total=2, status="rounds"), completed=2)
    shown = [line.split(" [")[0] for line in stream.getvalue().splitlines()]
    assert shown == ["measuring: 0/2 rounds", "measuring: 2/2 rounds"]


def test_printed_text_is_never_rewritten_into_emoji():
    """rich reads `:cd:` as an emoji code: a certificate fingerprint such as 45:CD:8D printed as 45💿8D
    could not be pinned (and a path holding `:ab:` would change)."""
    from edgeprune.cli import err, out

    line = "TLS certificate SHA-256: 45:CD:8D:AB:1A in /tmp/x:ab:/y"
    for console in (out, err):
        with console.capture() as captured:
            console.print(line, highlight=False, markup=False)
        assert captured.get().strip() == line


class NoisyDevice:
    """Every model takes 1 ms, or 1.3 ms in a slow phase (three windows of every six): a shared host,
    where the test wants it; each model of a comparison gets windows of both. Nothing is run (the files
    are never opened), and a protocol of no minimum time takes exactly the 15 rounds."""

    name = "noisy"
    remote = False

    def __init__(self) -> None:
        self.spec = SimpleNamespace(protocol=Protocol(min_s=0.0), backend="onnxruntime")
        self.windows = 0

    def measure_many(self, items, protocol=None, *, on_result=None, fresh=False):
        out = []
        for j, _ in enumerate(items):
            ms = 1.3 if (self.windows // 3) % 2 else 1.0
            self.windows += 1
            out.append(Measurement(ms, ms, ms, 0.01, 20, 0.0))
            if on_result is not None:
                on_result(j, out[-1])
        return out


def test_a_noisy_device_is_said_once_per_run_with_its_figure(tmp_path):
    """Every measurement of a run on a noisy device disagrees with itself: the dense model at the start,
    each round's candidates beside it, the validation's three models (which said it once each). The
    run says it once, with the figure; another run says it again (the record is the run's)."""
    from edgeprune.latency.interleave import NoiseNote
    from edgeprune.models import build_model
    from edgeprune.pipeline.validate import measure_against_dense
    from edgeprune.pruning import space
    from edgeprune.search.measured import PlanMeter

    model, shape = build_model("resnet20", in_channels=1).eval(), (1, 1, 8, 8)
    s = space(model, torch.randn(*shape), step=8)
    logged: list[str] = []
    note, device = NoiseNote(), NoisyDevice()
    meter = PlanMeter(s, device, criterion="l2", relative=True, progress=False, log=logged.append, noise=note)
    try:
        meter.dense_ms, meter.dense_quietest_ms = meter.measure_dense()
        meter.referred([s.min_counts(), s.min_counts()])
    finally:
        meter.close()
    (tmp_path / "shipped.onnx").write_bytes(b"")
    measure_against_dense(
        device, tmp_path / "shipped.onnx", model, shape, shipped_weights=1000, repeats=4, progress=False,
        log=logged.append, noise=note,
    )  # fmt: skip
    said = [line for line in logged if "the device is noisy" in line]
    assert len(said) == 1 and note.said == said[0], logged
    assert said[0].startswith("the device is noisy: the dense model's rounds disagree by 30%, 1-1.3 ms over 15 rounds")
    assert said[0].endswith("ratios count each model's quietest round, budgets its steady runs (said once per run)")
    assert note.spreads == pytest.approx([0.3] * (1 + 3 + 3))  # every noisy model recorded, one line said
    again: list[str] = []  # another run: said again, of its own first noisy model
    measure_against_dense(
        NoisyDevice(), tmp_path / "shipped.onnx", model, shape, shipped_weights=None, repeats=4, progress=False,
        log=again.append,
    )  # fmt: skip
    assert [line.split(", 1-1.3")[0] for line in again if "the device is noisy" in line] == [
        "the device is noisy: the shipped model's rounds disagree by 30%"
    ]


def _evals(round_, budget, predicted, scores, first=0):
    return [
        {"i": first + j, "round": round_, "budget": budget, "predicted_ms": p, "score": sc, "plan_hash": f"{round_}{j}"}
        for j, (p, sc) in enumerate(zip(predicted, scores))
    ]


def test_the_scatter_plot_draws_each_round_with_its_own_search_budget(tmp_path):
    """A loosened round's plans lie past the budget in predicted ms, and measure within it: each round
    is drawn in its colour with its search budget's line, apart from the budget (as measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeprune.report.plots import draw_scatter, round_budgets, scatter_plot

    evals = _evals(0, 0.30, [0.29, 0.295, 0.3], [0.5, 0.55, 0.6]) + _evals(1, 0.36, [0.35, 0.358], [0.7, 0.72], 3)
    measured = [
        {"plan_hash": "02", "round": 0, "predicted_ms": 0.3, "measured_ms": 0.27},
        {"plan_hash": "11", "round": 1, "predicted_ms": 0.358, "measured_ms": 0.32},
    ]
    assert round_budgets(evals) == {0: 0.30, 1: 0.36}
    fig, ax = plt.subplots()
    draw_scatter(ax, evals, budget_ms=0.33, measured=measured, chosen={"measured_ms": 0.32, "score": 0.72})
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {
        "round 1 search budget 0.3 ms (predicted)",
        "round 2 search budget 0.36 ms (predicted, loosened)",
        "budget 0.33 ms (as measured)",
    }
    assert lines["round 2 search budget 0.36 ms (predicted, loosened)"].get_xdata()[0] == 0.36
    dots = {c.get_label(): c for c in ax.collections}
    assert {"round 1: 3 evaluations (predicted ms)", "round 2: 2 evaluations (predicted ms)"} <= set(dots)
    assert {"round 1: measured on the device", "round 2: measured on the device", "chosen"} <= set(dots)
    first, second = (dots[f"round {k}: {n} evaluations (predicted ms)"] for k, n in ((1, 3), (2, 2)))
    # a round's dots, its crosses and its search budget share its colour; the two rounds' differ
    colour = lines["round 2 search budget 0.36 ms (predicted, loosened)"].get_color()
    assert matplotlib.colors.same_color(second.get_facecolor()[0][:3], colour[:3])
    assert matplotlib.colors.same_color(dots["round 2: measured on the device"].get_facecolor()[0][:3], colour[:3])
    assert not matplotlib.colors.same_color(first.get_facecolor()[0][:3], colour[:3])
    plt.close(fig)
    fig, ax = plt.subplots()  # a FLOPs search: its budgets are shares of MACs, not on this axis
    draw_scatter(ax, evals, budget_ms=0.33, measured=measured, search_budgets=False)
    assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == [
        "budget 0.33 ms (as measured)"
    ]
    plt.close(fig)
    assert scatter_plot(evals, tmp_path / "scatter.png", budget_ms=0.33, measured=measured).stat().st_size > 5000


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, fast_device, cli):
    """One `edgeprune run` of the shipped resnet20, small: 4 evaluations, no finetune, a few rounds, on
    digits at 28x28 (its shape, and a test split of 360 images: this test is about what is printed)."""
    d = tmp_path_factory.mktemp("output")
    table = d / "resnet20.json"  # a copy: the profile stage may add to the table it is given
    shutil.copy(SHIPPED_TABLE, table)
    config = {
        "name": "quick",
        "out": str(d / "run"),
        "weights": "zoo:resnet20-fashion-mnist",
        "data": "digits:28",
        "device": fast_device,
        "table": str(table),
        "prune": {"budget": "60%", "evals": 4, "measure_top": 2, "heldout_images": 300, "loosen": 0},
        "finetune": {"epochs": 0},
        "export": {"formats": ["onnx"], "out": str(d / "export"), "accuracy_images": 300},
        "validate": {"repeats": 4, "sparse": False},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    r = cli("run", str(d / "config.yaml"), "--runs-dir", str(d / "runs"), "--threads", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    return {"out": r.stdout, "err": r.stderr, "run": d / "run"}


BUDGET = [
    r"(?<!search )budget (\d[\d.]*) ms",  # "budget 0.3368 ms" (the search budget is another figure)
    r"the (\d[\d.]*) ms budget",  # "meets the 0.3368 ms budget"
    r"\| budget \| (\d[\d.]*) ms",  # the validation table's row
]


def test_one_budget_figure_is_printed_everywhere(quick_run):
    run = quick_run["run"]
    results = json.loads((run / "results.json").read_text())
    validation = json.loads((run / "validation.json").read_text())
    assert validation["budget_ms"] == results["budget_ms"]  # the figure prune set, not measured again
    with sqlite3.connect(run / "evals.sqlite") as db:
        stored = json.loads(db.execute("SELECT value FROM state WHERE key = 'budget_ms'").fetchone()[0])
    assert stored == results["budget_ms"]
    text = {"printed": quick_run["out"], "report.md": (run / "report.md").read_text()}
    figures = {where: {m for p in BUDGET for m in re.findall(p, t, flags=re.I)} for where, t in text.items()}
    assert figures == {"printed": {f"{results['budget_ms']:.4g}"}, "report.md": {f"{results['budget_ms']:.4g}"}}
    # prune's log, its measured candidates, `run`'s title and verdict, all the same figure
    printed = quick_run["out"]
    budget = f"{results['budget_ms']:.4g} ms"
    assert f"budget {budget} (60% of dense)" in printed and f"(budget {budget}, " in printed
    assert f": budget {budget}" in printed and f"the {budget} budget" in printed


def test_run_prints_the_chosen_plan(quick_run):
    run = quick_run["run"]
    results = json.loads((run / "results.json").read_text())
    c, d = results["chosen"], results["dense"]
    summary = quick_run["out"][quick_run["out"].index("┏") :]  # `run`'s summary, after the stages' log
    line = next(line for line in summary.splitlines() if line.startswith("chosen plan "))
    assert line.startswith(f"chosen plan {c['plan_hash'][:8]}, round {c['round'] + 1} of {results['rounds']}: ")
    assert f"{c['macs'] / 1e6:.2f} of {d['macs'] / 1e6:.2f} MMACs" in line and f"{c['params']:,} of" in line
    plan = json.loads((run / "plan.json").read_text())
    kept = {g: len(plan["keep"].get(g, range(w))) for g, w in plan["widths"].items()}
    assert line.split("channels kept: ")[1] == ", ".join(
        f"{g} {kept[g]}/{plan['widths'][g]}" for g in sorted(plan["widths"], key=_natural)
    )


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def test_a_run_says_each_long_step_before_it_and_the_noise_at_most_once(quick_run):
    log = quick_run["out"]
    assert log.count("the device is noisy") <= 1
    # the dense model's proxy score is seconds of work: said before, its figure after
    assert log.index("scoring the dense model with the proxy") < log.index("the dense model's proxy accuracy")
    assert log.index("recalibrating the chosen plan's BatchNorm") < log.index("[finetune]")
    assert "scoring the model by PyTorch on the test split" in log
    # each measurement's progress is said when it starts, in rounds of all its models
    assert "measuring the dense model on " in quick_run["err"]
    assert re.search(r"measuring the dense model and \d candidates? on \S+: 0/15 rounds of \d models", quick_run["err"])


def test_predict_check_counts_its_plans(cli_here, fast_device, tmp_path):
    r = cli_here(
        "predict", "--weights", "zoo:resnet20-fashion-mnist", "--table", str(SHIPPED_TABLE), "--check", "2",
        "--device", fast_device,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # the prediction first, then the check says what it measures before it exports and measures
    assert out.index("resnet20: predicted") < out.index("checking the table against fast-ort: the dense model and 2")
    assert "exporting the dense model and 2 random plans: 0/3 models" in r.stderr
    assert "prediction error over 2 random plans measured on fast-ort" in out
    progress = [line for line in r.stderr.splitlines() if "rounds" in line]
    assert progress and all(
        line.startswith("measuring the dense model and 2 random plans on fast-ort: ") and "rounds of 3 models" in line
        for line in progress
    ), r.stderr
