import pytest
import torch

from edgeprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgeprune.errors import EdgepruneError
from edgeprune.models import build_model


def _ckpt():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    return model, Checkpoint("resnet20", 10, (1, 28, 28), "fashion-mnist", model.state_dict(), {"test_accuracy": 0.5})


def test_round_trip_identical_outputs(tmp_path):
    model, ckpt = _ckpt()
    save_checkpoint(ckpt, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.model == "resnet20" and loaded.input_shape == (1, 28, 28)
    assert loaded.meta["test_accuracy"] == 0.5 and "torch" in loaded.meta["versions"]
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.build()(x))


def test_checkpoint_holds_no_pickled_module(tmp_path):
    _, ckpt = _ckpt()
    save_checkpoint(ckpt, tmp_path / "m.pt")
    torch.load(tmp_path / "m.pt", weights_only=True)  # raises if anything but plain data is inside


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04garbage"])
def test_corrupt_checkpoint_one_line(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(EdgepruneError) as e:
        load_checkpoint(p)
    assert "corrupt" in str(e.value) and "\n" not in str(e.value)


def test_truncated_checkpoint(tmp_path):
    _, ckpt = _ckpt()
    save_checkpoint(ckpt, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgepruneError, match="corrupt"):
        load_checkpoint(tmp_path / "m.pt")


def test_not_an_edgeprune_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(EdgepruneError, match="not an edgeprune checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(EdgepruneError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
