import pytest
import torch

from edgeprune.checkpoint import load_checkpoint
from edgeprune.errors import EdgepruneError, Interrupted
from edgeprune.models import build_model
from edgeprune.training import Recipe, accuracy, fit, train
from edgeprune.training.train import resume_path


def test_train_learns_and_writes_checkpoint(tmp_path, digits):
    ckpt = train(model="resnet20", data=digits, out=tmp_path / "d.pt", recipe=Recipe(epochs=4, lr=0.05), progress=False)
    assert ckpt.meta["test_accuracy"] > 0.6  # chance is 0.1
    loaded = load_checkpoint(tmp_path / "d.pt")
    assert loaded.meta["recipe"]["epochs"] == 4 and loaded.dataset == "digits"
    assert abs(accuracy(loaded.build(), digits, "test") - ckpt.meta["test_accuracy"]) < 1e-9
    assert not resume_path(tmp_path / "d.pt").exists()


def test_interrupted_training_resumes_exactly(tmp_path, digits):
    recipe = Recipe(epochs=3, lr=0.05, max_batches_per_epoch=5)

    def fresh():
        torch.manual_seed(0)
        return build_model("resnet20", num_classes=10, in_channels=1)

    reference = fit(fresh(), digits, recipe, progress=False)

    def interrupt(epoch, model):
        if epoch == 2:
            raise KeyboardInterrupt

    state = tmp_path / "state"
    with pytest.raises(Interrupted, match="training stopped at step 10/15, saved in"):  # a KeyboardInterrupt still
        fit(fresh(), digits, recipe, state_file=state, progress=False, on_epoch_end=interrupt)
    assert state.exists()
    resumed = fit(fresh(), digits, recipe, state_file=state, progress=False)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_resume_with_other_recipe_refused(tmp_path, digits):
    state = tmp_path / "state"
    fit(
        build_model("resnet20", in_channels=1),
        digits,
        Recipe(epochs=1, max_batches_per_epoch=2),
        state_file=state,
        progress=False,
    )
    with pytest.raises(EdgepruneError, match="different recipe"):
        fit(
            build_model("resnet20", in_channels=1),
            digits,
            Recipe(epochs=2, max_batches_per_epoch=2),
            state_file=state,
            progress=False,
        )


def test_cosine_schedule():
    r = Recipe(lr=0.1, warmup_epochs=1)
    assert r.lr_at(0, 100, 10) == pytest.approx(0.01)
    assert r.lr_at(10, 100, 10) == pytest.approx(0.1)
    assert r.lr_at(99, 100, 10) < 0.001
