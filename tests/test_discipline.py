"""Input discipline: every bad value, wrong table, foreign run folder, second writer and Ctrl-C
ends in one line a user can act on (exit 2, or 130 with the command that resumes), before any
expensive work, and loses or overwrites nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT

ZOO = "zoo:resnet20-fashion-mnist"
NEG_THREADS = "name: neg\nbackend: onnxruntime\noptions: {threads: -1}\n"


def one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(f"weights: {ZOO}\ndevice: cpu-onnxruntime\nout: {tmp_path / 'run'}\n{text}\n")
    return str(path)


PRUNE = ("prune", "--weights", ZOO, "--device", "cpu-onnxruntime", "--budget-ms", "50%")
BAD = {  # arguments (RUN: a run folder, CONFIG: a config file with the text given) -> what the line says
    "budget nan": ((*PRUNE[:-1], "nan", "--out", "RUN"), "budget must be a positive, finite number"),
    "clusters 0": ((*PRUNE, "--clusters", "0", "--out", "RUN"), "--clusters must be at least 1, got 0"),
    "threads -1": ((*PRUNE, "--threads", "-1", "--out", "RUN"), "--threads must be at least 1, got -1"),
    "seed -1": ((*PRUNE, "--seed", "-1", "--out", "RUN"), "--seed must be at least 0, got -1"),
    "budget 150%": ((*PRUNE[:-1], "150%", "--out", "RUN"), "budget '150%' is not below the dense model's latency"),
    "device as markup": (
        (*PRUNE[:3], "--device", "[/x]", "--budget-ms", "50%", "--out", "RUN"),
        "unknown device '[/x]'",
    ),
    "finetune seeds 0": (("finetune", "RUN", "--seeds", "0"), "--seeds must be at least 1, got 0"),
    "train seed": (("train", "--model", "resnet20", "--data", "digits", "--out", "RUN", "--seed", "-2"), "--seed"),
    "evals not a number": ((*PRUNE, "--evals", "abc", "--out", "RUN"), "Invalid value for '--evals'"),
    "unknown option": ((*PRUNE, "--evlas", "3", "--out", "RUN"), "No such option: --evlas"),
    "missing option": (PRUNE, "Missing option '--out'"),
    "finetune lr nan": (("finetune", "RUN", "--lr", "nan"), "--lr must be more than 0, got nan"),
    "finetune alpha": (("finetune", "RUN", "--alpha", "1.5"), "--alpha must be in [0, 1], got 1.5"),
    "finetune device": (("finetune", "RUN", "--train-device", "gpu"), "unknown torch device 'gpu'"),
    "qat threshold": (
        ("finetune", "RUN", "--qat", "--qat-threshold", "-1"),
        "--qat-threshold must be at least 0, got -1",
    ),
    "export format": (("export", "RUN", "--format", "tflite"), "unknown export format 'tflite'"),
    "export images": (("export", "RUN", "--accuracy-images", "0"), "--accuracy-images must be at least 1"),
    "validate repeats": (("validate", "RUN", "--repeats", "0"), "--repeats must be at least 1"),
    "validate claim": (("validate", "RUN", "--claim-speedup", "-2"), "--claim-speedup must be more than 0"),
    "profile calibrate": (("profile", "--model", "resnet20", "--calibrate", "-1"), "--calibrate must be at least 0"),
    "profile step": (("profile", "--model", "resnet20", "--step", "0"), "--step must be a positive number or auto"),
    "predict check": (("predict", "--model", "resnet20", "--check", "-1"), "--check must be a number of plans"),
    "train lr": (("train", "--model", "resnet20", "--data", "digits", "--out", "RUN", "--lr", "inf"), "--lr must"),
    "run threads": (("run", "--threads", "0"), "--threads must be at least 1, got 0"),
    "device threads": (("profile", "--model", "resnet20", "--device", "DEVICE"), "threads must be at least 1"),
    "agent port": (("agent", "serve", "--device", "cpu-onnxruntime", "--port", "0"), "--port must be in [1, 65535]"),
    "config evals": (("run", "CONFIG:prune: {budget: 50%, evals: sixty}"), "section prune: evals must be a whole"),
    "config seed": (("run", "CONFIG:prune: {budget: 50%, seed: -1}"), "section prune: seed must be at least 0"),
    "config budget": (("run", "CONFIG:prune: {budget: 100%}"), "section prune: budget '100%' is not below"),
    "config misspelt": (("run", "CONFIG:prune: {budget: 50%, evlas: 6}"), "unknown prune setting(s) ['evlas']"),
    "config finetune": (("run", "CONFIG:finetune: {epochs: 2, alpha: 2}"), "section finetune: alpha must be in [0, 1]"),
    "config lr text": (("run", "CONFIG:finetune: {lr: 5e-2}"), "got the text '5e-2' (in YAML, write 0.05 or 5.0e-2)"),
    "config train": (
        ("run", "CONFIG:model: resnet20\ntrain: {epochs: -1}"),
        "section train: epochs must be at least 1",
    ),
    "config profile": (("run", "CONFIG:profile: {step: 0}"), "section profile: step must be at least 1, got 0"),
    "config validate": (("run", "CONFIG:validate: {sparse: 3}"), "section validate: sparse must be true or false"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_value_is_one_line_before_any_work(case, cli_here, tmp_path):
    args, said = BAD[case]
    (tmp_path / "neg.yaml").write_text(NEG_THREADS)

    def concrete(a: str) -> str:
        if a.startswith("CONFIG:"):
            return _config(tmp_path, a[len("CONFIG:") :])
        return {"RUN": str(tmp_path / "run"), "DEVICE": str(tmp_path / "neg.yaml")}.get(a, a)

    started = time.monotonic()
    line = one_error_line(cli_here(*map(concrete, args)))
    assert said in line, line
    assert not (tmp_path / "run").exists()  # nothing was started, nothing blocks the corrected command
    assert time.monotonic() - started < 30  # before the model is measured or trained (which takes minutes)


def test_predict_refuses_another_models_table(cli_here):
    table = ROOT / "latency_tables" / "cpu-onnxruntime" / "resnet20.json"
    line = one_error_line(cli_here("predict", "--model", "resnet56", "--table", str(table)))
    assert "resnet20" in line and "profile resnet56 into a table of its own" in line
    assert "edgeprune profile --model resnet56 --device cpu-onnxruntime --step" in line
    r = cli_here("predict", "--model", "resnet20", "--table", str(table))  # its own model: a prediction
    assert r.returncode == 0 and "predicted" in r.stdout


def test_this_setups_own_table_wins_over_another_setups_named_one(tiny_run, tmp_path):
    """A config written on another machine names that machine's table; this machine's own table of
    the same device profile and model, beside it, is used, and the log says so."""
    from edgeprune.devices import Device
    from edgeprune.latency.table import find_table, setup_name

    device = Device.load(tiny_run["device"])
    table = json.loads(Path(tiny_run["table"]).read_text())
    named = tmp_path / "tables" / device.name / "resnet20.json"
    own = named.parent / setup_name(device.fingerprint()) / "resnet20.json"
    own.parent.mkdir(parents=True)
    own.write_text(json.dumps(table))
    named.write_text(json.dumps({**table, "fingerprint": {**table["fingerprint"], "cpu": "Another CPU"}}))
    said = []
    assert find_table(device, "resnet20", named, log=said.append) == own
    assert said and str(own) in said[0] and str(named) in said[0]
    assert find_table(device, "resnet56", named, log=said.append) == named  # another model's: as named
    assert find_table(device, "resnet20", named, writing=True) == named  # writing: never swapped


def test_a_table_at_another_step_says_which_step_extends_it(tiny_run, cli_here, tmp_path):
    table = tmp_path / "t.json"
    table.write_text(Path(tiny_run["table"]).read_text())
    before = table.read_text()
    args = ("profile", "--weights", tiny_run["weights"], "--device", tiny_run["device"], "--out", str(table))
    line = one_error_line(cli_here(*args, "--step", "16"))
    assert "channel step 8, not 16: add --step 8 to extend it" in line, line
    assert table.read_text() == before


def test_an_unreachable_budget_at_a_coarse_step_names_a_finer_step():
    """resnet20 at channel step 16: its 16-channel first stage cannot shrink at all, so the hint is
    a finer step (not --depth or --min-keep, which cannot help there)."""
    import torch

    from edgeprune.errors import EdgepruneError
    from edgeprune.models import build_model
    from edgeprune.pruning import space
    from edgeprune.search import BudgetProblem, FlopsCost

    s = space(build_model("resnet20", in_channels=1), torch.randn(1, 1, 28, 28), step=16)
    with pytest.raises(EdgepruneError, match=r"finer step \(edgeprune profile \.\.\. --step 8\)"):
        BudgetProblem.create(s, FlopsCost(s.cost, s.macs()), 0.05)


def _tiny_prune(tiny_run, out: Path, evals: int) -> list[str]:
    return [
        *("prune", "--weights", tiny_run["weights"], "--device", tiny_run["device"], "--table", tiny_run["table"]),
        *("--budget-ms", "80%", "--search", "random", "--evals", str(evals), "--measure-top", "2"),
        *("--heldout-images", "300", "--out", str(out)),
    ]


def _start(args: list[str]) -> subprocess.Popen:
    """The real command in its own process group, as a terminal runs it (Ctrl-C reaches the group).

    A terminal's foreground command takes Ctrl-C; a background job of a non-interactive shell (a CI
    runner's `cmd &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler: Ctrl-C would do nothing, as the user asked. The command gets SIGINT's default here,
    whatever the suite inherited (a Python handler here is reset to the default across exec)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "edgeprune", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"ended before the moment the test waits for: {proc.communicate()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _evals(run: Path) -> list[tuple]:
    try:
        with sqlite3.connect(run / "evals.sqlite") as con:
            return con.execute("SELECT i, counts, score FROM evals ORDER BY i").fetchall()
    except sqlite3.Error:
        return []


def _holder_pid(run: Path) -> int | None:
    try:
        return json.loads((run / ".lock").read_text()).get("pid")
    except (OSError, ValueError):
        return None


def test_a_second_writer_and_a_foreign_file_are_refused(tiny_run, cli_here, tmp_path):
    """While a prune writes its folder, a second prune on it and a finetune of it are refused in one
    line naming the holder, and the first finishes with everything; then a folder that mixes in
    another run's files is refused by finetune, export and validate instead of used."""
    from edgeprune.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    first = _start(_tiny_prune(tiny_run, run, 4))
    _wait_for(lambda: _holder_pid(run) == first.pid, first)
    line = one_error_line(cli_here(*_tiny_prune(tiny_run, run, 4)))
    assert f"being written by another edgeprune process (PID {first.pid}: " in line, line
    assert f"PID {first.pid}" in one_error_line(cli_here("finetune", str(run)))
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert len(_evals(run)) >= 4 and (run / "pruned.pt").is_file()  # the first one lost nothing

    dense, pruned = load_checkpoint(run / "dense.pt"), load_checkpoint(run / "pruned.pt")
    pruned_file = (run / "pruned.pt").read_bytes()
    other = load_checkpoint(run / "dense.pt")
    name = next(k for k, v in other.state_dict.items() if v.is_floating_point())
    other.state_dict[name] = other.state_dict[name] + 0.01  # the same architecture, other weights
    save_checkpoint(other, run / "dense.pt")
    (run / "export.json").write_text(json.dumps({"manifest": str(tmp_path / "manifest.json"), "out": str(tmp_path)}))
    manifest = {"input_shape": [1, 1, 16, 16], "source": str(run / "pruned.pt")}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for verb in ("finetune", "export", "validate"):
        assert "holds other weights than the dense model this run pruned" in one_error_line(cli_here(verb, str(run)))
    save_checkpoint(dense, run / "dense.pt")
    group = next(iter(pruned.plan["keep"]))
    pruned.plan["keep"][group] = pruned.plan["keep"][group][:-1]  # pruned by another plan
    save_checkpoint(pruned, run / "pruned.pt")
    for verb in ("finetune", "export", "validate"):
        assert "was pruned by another plan than this run's plan.json" in one_error_line(cli_here(verb, str(run)))
    (run / "pruned.pt").write_bytes(pruned_file)
    (run / "dense.pt").write_bytes(pruned_file)  # a pruned model where the dense one goes
    assert "holds a pruned model where this run keeps its dense one" in one_error_line(cli_here("finetune", str(run)))


def test_a_config_corrected_after_a_failed_start_runs_and_one_after_the_search_is_refused(tmp_path):
    """`edgeprune run` whose prune failed before its search began (an unreachable budget) takes the
    corrected config and runs its stages again; once a search has started, the run is its config's."""
    from edgeprune.pipeline.run import Pipeline

    run = tmp_path / "run"
    first = {"weights": ZOO, "device": "cpu-onnxruntime", "prune": {"budget": "1%"}}
    run.mkdir()
    (run / "pipeline.json").write_text(json.dumps({"config": first, "stages": {"profile": "done"}, "seconds": {}}))
    said: list[str] = []
    corrected = {**first, "prune": {"budget": "50%"}}
    p = Pipeline(corrected, run, progress=False, log=said.append)
    assert p.state["stages"] == {} and p.state["config"] == corrected
    assert "changed before its search started" in said[0]
    (run / "config.json").write_text("{}")  # the search started with the first config
    from edgeprune.errors import EdgepruneError

    with pytest.raises(EdgepruneError, match="was run with another config"):
        Pipeline(corrected, run, progress=False, log=said.append)


def _interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C at a terminal: the whole foreground group
    return proc.communicate(timeout=120)


@pytest.mark.slow  # ~1-2 min: a profile, a prune resumed to 12 evaluations, a finetune
def test_ctrl_c_during_profile_and_prune_keeps_the_work_and_says_how_to_go_on(tiny_run, tmp_path):
    from edgeprune.latency.table import LatencyTable

    table = tmp_path / "t.json"
    profile = _start(["profile", "--weights", tiny_run["weights"], "--device", tiny_run["device"], "--out", str(table)])
    _wait_for(table.is_file, profile)
    out, err = _interrupt(profile)
    assert profile.returncode == 130, err
    assert "Traceback" not in out + err
    assert f"to go on: edgeprune profile --weights {tiny_run['weights']}" in err, err
    assert LatencyTable.load(table).entries  # the batches measured are kept, and the file whole

    run = tmp_path / "run"
    prune = _start(_tiny_prune(tiny_run, run, 12))
    _wait_for(lambda: len(_evals(run)) >= 2, prune)
    out, err = _interrupt(prune)
    assert prune.returncode == 130, err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    kept = _evals(run)
    assert len(lines) == 1 and f"{len(kept)} evaluations" in lines[0], err
    resume = lines[0].split("to go on: ")[1]
    assert resume == " ".join(["edgeprune", *_tiny_prune(tiny_run, run, 12), "--resume"])
    r = subprocess.run(
        [sys.executable, "-m", "edgeprune", *resume.split()[1:]], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert _evals(run)[: len(kept)] == kept and len(_evals(run)) >= 12  # went on from what was kept

    finetune = _start(["finetune", str(run), "--epochs", "20"])  # its resume file: the position kept
    _wait_for((run / "finetuned.pt.resume").is_file, finetune)
    out, err = _interrupt(finetune)
    assert finetune.returncode == 130 and "Traceback" not in out + err, err
    assert "training stopped at step" in err and f"to go on: edgeprune finetune {run} --epochs 20" in err, err
