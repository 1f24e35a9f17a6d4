VERBS = [
    "models",
    "train",
    "devices",
    "measure",
    "profile",
    "predict",
    "prune",
    "finetune",
    "export",
    "validate",
    "run",
]


def test_help(cli):
    r = cli("--help")
    assert r.returncode == 0
    for verb in VERBS:
        assert verb in r.stdout


def test_verb_help():
    """Every verb's --help, through the real command's click app, in one process (each verb in a
    process of its own took ~2.5 s, most of it importing torch)."""
    import subprocess
    import sys

    from .conftest import ROOT

    code = (
        "import sys; from typer.main import get_command; from click.testing import CliRunner; "
        "from edgeprune.cli import app; command = get_command(app); runner = CliRunner()\n"
        f"for verb in {VERBS!r}:\n"
        "    r = runner.invoke(command, [verb, '--help'], prog_name='edgeprune')\n"
        "    print(verb, r.exit_code, 'Usage' in r.output, 'Traceback' in r.output)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == [f"{verb} 0 True False" for verb in VERBS], r.stdout


def _one_line_error(r):
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_unknown_model(cli, tmp_path):
    line = _one_line_error(cli("train", "--model", "resnet21", "--data", "digits", "--out", str(tmp_path / "x.pt")))
    assert "resnet20" in line and "resnet56" in line


def test_unknown_dataset(cli, tmp_path):
    line = _one_line_error(cli("train", "--model", "resnet20", "--data", "mnist", "--out", str(tmp_path / "x.pt")))
    assert "fashion-mnist" in line


def test_missing_data_files(cli, tmp_path):
    r = cli(
        "train",
        "--model",
        "resnet20",
        "--data",
        "fashion-mnist",
        "--out",
        str(tmp_path / "x.pt"),
        env={"EDGEPRUNE_FASHION_MNIST": str(tmp_path)},
    )
    assert "dataset-fashion-mnist" in _one_line_error(r)


def test_corrupt_checkpoint(cli, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    line = _one_line_error(
        cli(
            "prune",
            "--weights",
            str(bad),
            "--device",
            "cpu-onnxruntime",
            "--budget-ms",
            "1",
            "--out",
            str(tmp_path / "r"),
        )
    )
    assert "corrupt" in line


def test_bad_pipeline_config(cli, tmp_path):
    (tmp_path / "c.yaml").write_text("weights: zoo:resnet20-fashion-mnist\ndevice: cpu-onnxruntime\nprunning: {}\n")
    assert "unknown config section(s) ['prunning']" in _one_line_error(cli("run", str(tmp_path / "c.yaml")))
    (tmp_path / "d.yaml").write_text("weights: [unclosed\n")
    assert "not valid YAML" in _one_line_error(cli("run", str(tmp_path / "d.yaml")))
    # a misspelt setting of a late stage is refused before the first stage starts, not minutes later
    (tmp_path / "e.yaml").write_text(
        f"weights: zoo:resnet20-fashion-mnist\ndevice: cpu-onnxruntime\nout: {tmp_path / 'run'}\n"
        "finetune: {epochs: 1}\nvalidate: {claim: 3.87}\n"
    )
    said = _one_line_error(cli("run", str(tmp_path / "e.yaml")))
    assert "unknown validate setting(s) ['claim'] in the config; known: claim_speedup, device" in said
    assert not (tmp_path / "run").exists()


def test_train_cli_json(cli, tmp_path):
    import json

    r = cli(
        "train", "--model", "resnet20", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "d.pt"), "--json"
    )
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads(r.stdout.strip().splitlines()[-1])["test_accuracy"] <= 1
