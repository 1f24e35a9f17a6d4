"""Ship it: finetune with distillation, export with parity, validate on the device, report, `run`."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from edgeprune.backends import TensorRtBackend
from edgeprune.checkpoint import Checkpoint, load_checkpoint
from edgeprune.pruning import space
from edgeprune.training import accuracy

from .conftest import ROOT


def test_finetune_improves_a_pruned_model(tiny_run, digits16, tmp_path):
    """Model in, model out: the best epoch by held-out accuracy; in a run folder's store, the best
    epoch so far is the checkpoint, and a finished finetune is not repeated."""
    from edgeprune.pipeline import finetune
    from edgeprune.training import CheckpointStore, DistillConfig, Recipe

    dense = load_checkpoint(tiny_run["weights"])
    model = dense.build()
    plan = space(model, torch.randn(1, 1, 16, 16), step=16).uniform(0.25)
    pruned = plan.apply(model)
    before = accuracy(pruned, digits16, "heldout")
    best = finetune(pruned, teacher=model, data=digits16, epochs=4, lr=0.05, progress=False)
    assert best.score > before + 0.05 and best.history[0]["score"] == pytest.approx(before)
    assert accuracy(best.model, digits16, "heldout") == pytest.approx(best.score)
    assert best.score == max(h["score"] for h in best.history) and len(best.history) == 5
    student = Checkpoint(dense.model, 10, dense.input_shape, dense.dataset, pruned.state_dict(), {}, plan.to_dict())
    store = CheckpointStore(tmp_path / "ft.pt", student, Recipe(epochs=4, lr=0.05), DistillConfig())
    again = finetune(plan.apply(model), teacher=model, data=digits16, epochs=4, lr=0.05, store=store, progress=False)
    assert again.history == best.history  # the same recipe and seed: the same finetune
    kept = load_checkpoint(tmp_path / "ft.pt")
    assert kept.meta["history"] == best.history and kept.meta["best_epoch"] == best.best_epoch
    assert accuracy(kept.build(), digits16, "heldout") == pytest.approx(best.score)


@pytest.fixture(scope="module")
def pipeline_run(tiny_run, tmp_path_factory, cli):
    """One whole `edgeprune run CONFIG` on the tiny model (prune, finetune, export, validate, report)."""
    d = tmp_path_factory.mktemp("pipe")
    config = {
        "name": "tiny",
        "out": str(d / "run"),
        "weights": tiny_run["weights"],
        "device": tiny_run["device"],
        "table": tiny_run["table"],
        # a 10 % margin: the tiny device's fast protocol moves the plan/dense ratio by a few percent
        # between the search's measurement and validation's, and this test is about the chaining
        "prune": {
            "budget": "80%",
            "search": "bocr",
            "evals": 12,
            "measure_top": 2,
            "heldout_images": 300,
            "margin": 0.1,
        },
        "finetune": {"epochs": 2, "lr": 0.02},
        "export": {"formats": ["onnx", "openvino"], "out": str(d / "export")},
        "validate": {"claim_speedup": 3.87},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    r = cli("run", str(d / "config.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    stderr, summary = r.stderr, json.loads(r.stdout)
    # a slow phase of this host can move the tiny plan's ratio to dense past the margin between the
    # search and validation (fresh-clone CI: 0.65 of dense in the search, ~0.74 when validated, the
    # dense model 0.27-0.61 ms over the rounds): where the validation said the device was noisy and
    # missed, validate again (what its user would do), twice at most; the run's summary then reads it
    for _ in range(2):
        if summary["meets_budget"] or "the device is noisy" not in stderr:
            break
        v = cli("validate", str(d / "run"), "--claim-speedup", "3.87", "--json")
        r = cli("run", str(d / "config.yaml"), "--json")
        assert r.returncode == 0, r.stderr
        stderr, summary = v.stderr, json.loads(r.stdout)
    return {"dir": d, "run": d / "run", "summary": summary, "stderr": stderr, "config": config}


def test_run_chains_every_stage(pipeline_run):
    s, run = pipeline_run["summary"], pipeline_run["run"]
    assert set(s["stages"]) == {"profile", "prune", "finetune", "export", "validate", "report"}
    # the run's one budget figure (prune's), and the shipped model's time as held against it
    assert s["meets_budget"] and s["held_ms"] <= s["budget_ms"] and s["speedup"] > 1
    assert 0 <= s["pruned_test_accuracy"] <= 1 and s["onnx"].endswith("model.onnx")
    v = json.loads((run / "validation.json").read_text())
    assert v["claim"]["claimed_speedup"] == 3.87 and v["claim"]["measured_speedup"] == pytest.approx(v["speedup"])
    sp = v["unstructured_sparse"]
    params = load_checkpoint(run / "finetuned.pt").build()
    from edgeprune.pruning.sparse import weight_count

    assert sp["nonzero_weights"] == weight_count(params) and sp["measured"]["median_ms"] > 0
    # the search's prediction is carried to the dense model as it measures now: its error is the table's
    res = json.loads((run / "results.json").read_text())
    now, then = v["dense_measured"]["median_ms"], res["dense"]["measured_ms"]
    assert v["predicted_at_search_ms"] == res["chosen"]["predicted_ms"] and v["dense_at_search_ms"] == then
    assert v["predicted_ms"] == pytest.approx(res["chosen"]["predicted_ms"] * now / then)
    measured = v["measured"]["median_ms"]
    assert v["prediction_error_pct"] == pytest.approx((v["predicted_ms"] - measured) / measured * 100)
    assert s["predicted_ms"] == v["predicted_ms"] and s["prediction_carried"] == (now != then)
    # the export's manifest carries the validation (it travels without the run directory)
    m = json.loads((pipeline_run["dir"] / "export" / "manifest.json").read_text())["validation"]
    assert m["measured_ms"] == v["measured"]["median_ms"] and m["meets_budget"] == v["meets_budget"]
    assert m["device"] == v["device"] and m["speedup"] == v["speedup"]
    assert v["accuracy_images"] is None  # the runtime scored the whole test split, as the dense model was


def test_finetune_qat_on_a_run_once(pipeline_run, tmp_path, cli_here):
    """`finetune --qat` after a finished finetune: the held-out scores of the float model and its
    int8 file recorded, QAT run where int8 loses, its model kept only where its file scores higher
    (the model it replaced kept beside it); a second call does nothing again; the report says it;
    other settings start again from the finetune's own model."""
    from edgeprune.report import write_report

    run = tmp_path / "run"
    shutil.copytree(pipeline_run["run"], run)
    before = load_checkpoint(run / "finetuned.pt")
    args = ("finetune", str(run), "--epochs", "2", "--lr", "0.02", "--qat", "--qat-threshold", "0")
    r = cli_here(*args)
    assert r.returncode == 0, r.stderr
    assert "int8:" in r.stdout and "held-out images" in r.stdout
    q = json.loads((run / "finetune.json").read_text())["qat"]
    assert q["ran"] == (q["heldout_fp32"] - q["heldout_int8"] > 0)
    assert q["kept"] == (q["ran"] and q["heldout_int8_after"] > q["heldout_int8"])
    after = load_checkpoint(run / "finetuned.pt")
    assert after.meta["qat"]["summary"] == q["summary"] and after.meta["finished"]
    assert (run / "finetuned-before-qat.pt").is_file() == q["kept"]
    changed = any(not torch.equal(a, before.state_dict[k]) for k, a in after.state_dict.items())
    assert changed == q["kept"]
    again = cli_here(*args)
    assert again.returncode == 0 and "quantization-aware finetune already done" in again.stderr + again.stdout
    write_report(run)
    assert f"Quantization-aware finetune (`--qat`): {q['summary']}." in (run / "report.md").read_text()
    # other settings start from the finetune's own model: a threshold no loss reaches puts it back
    assert cli_here(*args[:-1], "1").returncode == 0
    assert not json.loads((run / "finetune.json").read_text())["qat"]["ran"]
    back = load_checkpoint(run / "finetuned.pt").state_dict
    assert all(torch.equal(a, before.state_dict[k]) for k, a in back.items())
    assert not (run / "finetuned-before-qat.pt").is_file()


def test_the_validation_table_gives_the_search_s_prediction_where_the_device_drifted():
    from edgeprune.report.report import validation_rows

    def ms(v):
        return {"median_ms": v, "extra": {}}

    val = {"budget_ms": 1.2, "measured": ms(1.0), "meets_budget": True, "predicted_ms": 1.1,
           "prediction_error_pct": 10.0, "predicted_at_search_ms": 1.0, "dense_at_search_ms": 2.0,
           "prediction_error_at_search_pct": 0.0, "dense_measured": ms(2.2), "speedup": 2.2,
           "test_accuracy": 0.9, "dense_test_accuracy": 0.91, "accuracy_delta_points": -1.0, "claim": None,
           "unstructured_sparse": None}  # fmt: skip
    row = next(r for r in validation_rows(val) if r[0] == "predicted by the table")
    assert row[1] == "1.1 ms" and row[2] == (
        "error +10.0 % (1 ms at the search, error +0.0 %; the dense model measured 2 ms then, 2.2 ms now)"
    )
    steady = {**val, "predicted_ms": 1.0, "prediction_error_pct": 0.0, "dense_measured": ms(2.0)}
    assert next(r for r in validation_rows(steady) if r[0] == "predicted by the table")[2] == "error +0.0 %"


def test_exports_pass_parity_in_both_runtimes(pipeline_run):
    manifest = json.loads((pipeline_run["dir"] / "export" / "manifest.json").read_text())
    for fmt in ("onnx", "openvino"):
        p = manifest["formats"][fmt]["parity"]
        assert p["max_rel_diff"] < 1e-4 and p["top1_agreement"] == 1.0, (fmt, p)
        assert p["passed"] is True and p["failed"] is None and p["tolerance"]["max_rel_diff"] == 1e-3
        assert p["test_accuracy"] == pytest.approx(manifest["accuracy"]["pytorch_test"], abs=0.01)
        for f in manifest["formats"][fmt]["files"]:
            assert len(f["sha256"]) == 64 and f["bytes"] > 0
    assert manifest["formats"]["onnx"]["checker"].startswith("passed") and manifest["formats"]["onnx"]["opset"] >= 17
    assert manifest["plan"]["keep"] and manifest["latency"]["budget_ms"] > 0


def test_report_is_written_with_its_images(pipeline_run):
    run = pipeline_run["run"]
    md = (run / "report.md").read_text()
    for image in ("convergence.png", "scatter.png", "prediction.png"):
        assert f"]({image})" in md and (run / image).stat().st_size > 5000
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "Validation on the device" in html
    # a run whose search budget was loosened says so where it counts its rounds
    from edgeprune.report import write_report

    saved = (run / "results.json").read_text()
    loosened = json.loads(saved)["loosened"]  # whether this run's own search loosened its budget
    assert ("loosened search budget" in md) == loosened
    try:
        (run / "results.json").write_text(json.dumps({**json.loads(saved), "loosened": not loosened}))
        write_report(run)
        assert ("the last at a loosened search budget" in (run / "report.md").read_text()) != loosened
    finally:  # later tests see the run as it was
        (run / "results.json").write_text(saved)
        write_report(run)


def test_validation_flags_a_model_over_budget(pipeline_run, cli):
    run = pipeline_run["run"]
    saved = {name: (run / name).read_text() for name in ("results.json", "config.json")}
    results, config = json.loads(saved["results.json"]), json.loads(saved["config.json"])
    # a budget in ms is held as written
    results["budget_ms"] = results["chosen"]["measured_ms"] / 10
    config["budget"] = f"{results['budget_ms']:.5f}ms"
    (run / "results.json").write_text(json.dumps(results))
    (run / "config.json").write_text(json.dumps(config))
    r = cli("validate", str(run), "--no-sparse", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["meets_budget"] is False
    v = json.loads(r.stdout)  # the shipped and dense models measured in turn, 15 rounds or more; the quietest counts
    # validation run by hand ends with the run's report rewritten with it
    md = (run / "report.md").read_text()
    assert v["report"] == str(run / "report.html") and "the shipped model misses the " in md
    assert f"misses the {v['budget_ms']:.4g} ms budget: median " in md
    # the verdict names its statistic (the device profile's; the median of steady runs by default)
    # in validation.json, the report and the table `edgeprune validate` prints
    assert v["verdict"]["statistic"] == "median" and v["verdict"]["outcome"] == "misses"
    assert v["verdict"]["steady"]["windows"] == v["repeats"] and v["verdict"]["steady"]["p90_ms"] > 0
    from edgeprune.report.report import validation_rows

    row = next(r for r in validation_rows(v) if r[0].startswith("verdict"))
    assert row[:2] == ["verdict, on the median of steady runs", "MISSES"] and "p90" in row[2]
    assert v["repeats"] >= 15
    for m in (v["measured"], v["dense_measured"]):
        assert len(m["extra"]["rounds_ms"]) == v["repeats"] and m["median_ms"] == min(m["extra"]["rounds_ms"])
    r = cli("validate", str(run), "--no-sparse", "--repeats", "0")
    assert r.returncode == 2 and "--repeats must be at least 1" in r.stderr and "Traceback" not in r.stderr
    # a share of the dense model is held against the dense model measured now
    config["budget"] = "10%"
    (run / "config.json").write_text(json.dumps(config))
    r = cli("validate", str(run), "--no-sparse")
    for name, text in saved.items():  # later tests see the run as it was
        (run / name).write_text(text)
    assert r.returncode == 1 and "MISSES" in r.stdout


class _ExportsSomethingElse(torch.nn.Module):
    """A model with an export-time branch: the graph the exporter records is not what PyTorch runs
    (the way a custom op's symbolic, or code that checks for export, ships a different model)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        y = self.net(x)
        return y.flip(1) if torch.onnx.is_in_onnx_export() else y


def test_an_export_that_computes_something_else_fails_parity(tiny_run, digits16, tmp_path):
    from edgeprune.formats import export_model, parity_failures
    from edgeprune.task import Task

    net = load_checkpoint(tiny_run["weights"]).build().eval()
    said = []
    task = Task.classification_on(digits16)
    artifacts = export_model(
        _ExportsSomethingElse(net),
        input_shape=(1, 1, 16, 16),
        out_dir=tmp_path,
        formats=["onnx", "openvino"],
        task=task,
        accuracy_images=50,
        log=said.append,
    )
    for fmt in ("onnx", "openvino"):
        p = artifacts[fmt]["parity"]
        assert p["passed"] is False and "outputs differ by" in p["failed"] and "top-1 agrees on" in p["failed"], p
        assert any(line.startswith(f"{fmt}: FAILS parity with PyTorch") for line in said), said
    assert [f.split(":")[0] for f in parity_failures(artifacts)] == ["onnx", "openvino"]
    assert (tmp_path / "model.onnx").is_file()  # kept, for a look
    # the same model without the branch passes
    good = export_model(net, input_shape=(1, 1, 16, 16), out_dir=tmp_path / "ok", formats=["onnx"], task=task,
                        accuracy_images=50, log=said.append)  # fmt: skip
    assert good["onnx"]["parity"]["passed"] and not parity_failures(good)


def test_validate_through_the_agent(pipeline_run, tiny_run, tmp_path):
    """The same run validated on a device reached through `edgeprune agent serve` (on loopback)."""
    from edgeprune.pipeline import validate_run as validate

    from .test_agent import AgentProcess

    run = pipeline_run["run"]
    manifest = pipeline_run["dir"] / "export" / "manifest.json"
    saved = {p: p.read_text() for p in (run / "validation.json", manifest)}
    # the run's device profile (its fast protocol) with an agent: the agent serves cpu-onnxruntime here
    spec = {**yaml.safe_load(open(tiny_run["device"]).read()), "name": "remote-tiny"}
    agent = AgentProcess(tmp_path).start()
    try:
        (tmp_path / "remote.yaml").write_text(
            yaml.safe_dump({**spec, "agent": agent.url, "token_file": str(agent.token_file)})
        )
        v = validate(run, device=str(tmp_path / "remote.yaml"), sparse=False, report=False, progress=False,
                     log=lambda s: None)  # fmt: skip
        assert v["device"] == "remote-tiny" and v["fingerprint"]["runtime"] == "onnxruntime"
        assert v["artifact"].endswith("model.onnx")  # an agent receives the ONNX file
        assert v["measured"]["median_ms"] > 0 and v["dense_measured"]["median_ms"] > 0
        assert isinstance(v["meets_budget"], bool) and v["repeats"] >= 15
        assert any((agent.cache / "results").glob("*.json")), "the agent measured nothing"
        assert json.loads(manifest.read_text())["validation"]["device"] == "remote-tiny"
    finally:
        agent.stop()
        for p, text in saved.items():  # later tests see the run as it was
            p.write_text(text)


def test_export_refuses_a_useless_accuracy_sample(pipeline_run, cli):
    r = cli("export", str(pipeline_run["run"]), "--accuracy-images", "0", "--out", str(pipeline_run["dir"] / "y"))
    assert r.returncode == 2 and "--accuracy-images must be at least 1" in r.stderr and "Traceback" not in r.stderr
    assert not (pipeline_run["dir"] / "y").exists()


@pytest.mark.skipif(TensorRtBackend.available(), reason="TensorRT is installed here")
def test_tensorrt_export_says_what_is_missing(pipeline_run, cli):
    r = cli("export", str(pipeline_run["run"]), "--format", "onnx,tensorrt", "--out", str(pipeline_run["dir"] / "x"))
    assert r.returncode == 2 and "TensorRT is not available here" in r.stderr
    assert not (pipeline_run["dir"] / "x").exists()  # refused before any work


def test_run_resumes_after_a_stage_is_interrupted(tiny_run, tmp_path, cli):
    config = {
        "out": str(tmp_path / "run"),
        "weights": tiny_run["weights"],
        "device": tiny_run["device"],
        "table": tiny_run["table"],
        "prune": {"budget": "80%", "search": "random", "evals": 6, "measure_top": 2, "heldout_images": 300},
        # 8 epochs: the kill lands within 50 ms of the first epoch's resume file, an epoch takes ~1 s here
        "finetune": {"epochs": 8, "lr": 0.02},
        "export": {"formats": ["onnx"], "out": str(tmp_path / "export")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeprune", "run", str(tmp_path / "c.yaml")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    resume_file = tmp_path / "run" / "finetuned.pt.resume"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not resume_file.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert resume_file.exists(), "finetuning never started"
    from edgeprune.training import resume_position

    done, batch = resume_position(resume_file)
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert state["stages"] == {"profile": "done", "prune": "done"}
    searched = json.loads((tmp_path / "run" / "results.json").read_text())
    assert searched["evals"] >= 6  # more when a budget tightening round ran
    r = cli("run", str(tmp_path / "c.yaml"))
    assert r.returncode == 0, r.stderr
    assert "[prune] done before: skipped" in r.stdout
    # the finetune went on from where it was killed, not from the start
    assert f"resuming where it was interrupted: {done} of 8 epochs done, then {batch} batches" in r.stdout, r.stdout
    said = " ".join(r.stdout.split())  # the summary a user reads
    assert "% error" in said and f"ONNX: {tmp_path / 'export' / 'model.onnx'}" in said, said
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == searched  # not searched again
    fine = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert len(fine["history"]) == 9 and not resume_file.exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    from edgeprune.pipeline.run import check_config, load_config
    from edgeprune.pipeline.settings import PruneSettings

    cfg = check_config(load_config(path))
    assert set(cfg.get("prune", {})) <= PruneSettings.names() | {"budget"}


def test_the_quickstart_runs_on_shipped_files_alone():
    """`edgeprune run` without a config (make demo): resnet20 on Fashion-MNIST, cpu-onnxruntime, half
    the dense latency, the knapsack; its checkpoint and latency table ship with the repository, so the demo
    profiles nothing and downloads nothing."""
    from edgeprune.pipeline.run import QUICKSTART, check_config
    from edgeprune.zoo import resolve_weights

    cfg = check_config(dict(QUICKSTART))
    ckpt = load_checkpoint(resolve_weights(cfg["weights"]))
    assert (ckpt.model, ckpt.dataset, cfg["device"]) == ("resnet20", "fashion-mnist", "cpu-onnxruntime")
    assert (cfg["prune"]["budget"], cfg["prune"]["search"]) == ("50%", "knapsack")
    assert (ROOT / "latency_tables" / cfg["device"] / f"{ckpt.model}.json").is_file()
