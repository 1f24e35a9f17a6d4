"""What the README promises, held to the code: its first Python example runs, every prune setting
it lists is the one the CLI and config files take, and the package's imports point down."""

import ast
import dataclasses
import re
import sys

import pytest

from edgeprune.pipeline.settings import PruneSettings

from .conftest import EXAMPLES, ROOT

README = (ROOT / "README.md").read_text()


def _python_example(heading: str) -> str:
    section = README[README.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_s_first_python_example_runs(tinynet_28, tmp_path, monkeypatch, capsys):
    """The README's model-in example, as written, on a user's TinyNet with trained weights. For
    speed, the device is ONNX Runtime with a short protocol (at step 16, like cpu-onnxruntime) and
    the data scikit-learn's digits at 28x28 (Fashion-MNIST's shape); the table the example writes
    is there already (profiled by the fixture with the same call), so its profile measures nothing."""
    import shutil

    code = _python_example("## Your own model, in Python")
    assert code.count('"cpu-onnxruntime"') == 1 and code.count('"fashion-mnist"') == 3
    assert 'out="tables/tinynet.json"' in code
    sys.path.insert(0, str(EXAMPLES))
    shutil.copy(tinynet_28["weights"], tmp_path / "tinynet.pt")
    (tmp_path / "tables").mkdir()
    shutil.copy(tinynet_28["table"], tmp_path / "tables" / "tinynet.json")
    code = code.replace('"cpu-onnxruntime"', repr(tinynet_28["device"])).replace('"fashion-mnist"', '"digits:28"')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    said = out.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+\.\d{3} ms, \d+\.\d\dx, meets budget: (True|False)", said), said
    assert "0 to measure" in out and (tmp_path / "export" / "tinynet" / "model.onnx").is_file()


def test_prune_settings_are_defined_once():
    """PruneSettings is the one definition: the CLI's prune options are generated from it, config
    files are checked against it, and the README lists every one of them with its default."""
    from edgeprune.cli import prune_cmd
    from edgeprune.pipeline.prune import CLUSTER
    from edgeprune.pipeline.run import stage_settings
    from edgeprune.pruning.criteria import CRITERIA
    from edgeprune.search import SEARCHERS

    options = set(prune_cmd.__signature__.parameters)
    assert PruneSettings.names() <= options
    assert stage_settings()["prune"] == PruneSettings.names() | {"budget"} | set(CLUSTER)
    assert set(CLUSTER) <= options
    fields = {f.name: f for f in dataclasses.fields(PruneSettings)}
    assert fields["search"].metadata["choices"] == tuple(SEARCHERS)
    assert fields["criterion"].metadata["choices"] == tuple(CRITERIA)
    for name, f in fields.items():
        flag = "--" + name.replace("_", "-")
        row = next((line for line in README.splitlines() if line.startswith(f"| `{flag}")), None)
        assert row is not None, f"README lists no {flag}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
        assert row.split("|")[2].strip() == ("" if shown in (None, []) else str(shown)), row


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("agent/client.py", ("edgeprune.agent.server", "fastapi")),
        ("latency", ("edgeprune.formats", "edgeprune.pipeline", "edgeprune.search")),
        ("pruning", ("edgeprune.latency", "edgeprune.search", "edgeprune.pipeline", "edgeprune.formats")),
        ("models", ("edgeprune.latency", "edgeprune.pruning", "edgeprune.search", "edgeprune.pipeline")),
        ("search", ("edgeprune.pipeline", "edgeprune.formats")),
        ("training", ("edgeprune.pipeline", "edgeprune.search", "edgeprune.latency")),
    ],
)
def test_imports_point_down_the_pipeline(module, forbidden):
    root = ROOT / "edgeprune" / module
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad = [n for n in names if n.startswith(forbidden)]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad[0]}"
