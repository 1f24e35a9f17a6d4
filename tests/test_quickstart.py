import json

from edgeprune.checkpoint import load_checkpoint
from edgeprune.pipeline import QuickstartConfig, run_quickstart
from edgeprune.training import Recipe, train


def test_quickstart_end_to_end_on_subset(tmp_path, fmnist):
    weights = tmp_path / "r20.pt"
    train(model="resnet20", data=fmnist, out=weights, recipe=Recipe(epochs=1, max_batches_per_epoch=20), progress=False)
    cfg = QuickstartConfig(checkpoint=str(weights), keep_ratio=0.5, finetune_batches=5, test_batches=2)
    result = run_quickstart(config=cfg, runs_root=tmp_path / "runs", progress=False, log=lambda s: None)
    for name in ("dense", "pruned"):
        row = result[name]
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["latency"]["median_ms"] > 0 and row["latency"]["n"] >= 50
    assert result["pruned"]["params"] < 0.4 * result["dense"]["params"]
    assert result["speedup"] > 1.0  # half the channels everywhere: faster, noise or not
    saved = json.loads((tmp_path / "runs").glob("quickstart-*/results.json").__next__().read_text())
    assert saved["pruned"]["onnx"].endswith("pruned.onnx")
    assert load_checkpoint(weights).model == "resnet20"
