"""Quantization-aware finetuning: the simulation is the int8 file's rounding, training through it
keeps weights on their int8 grid, and `finetune --qat` keeps its model only where the file scores
higher (`finetune --qat` on a run: tests/test_pipeline.py)."""

import numpy as np
import pytest
import torch

from edgeprune.checkpoint import load_checkpoint
from edgeprune.training.qat import QUANTIZED, WEIGHT_LEVELS, FakeQuantization


def _on_int8_grid(model) -> bool:
    """Whether every conv and linear weight is an integer multiple of its channel's absmax / 127."""
    for m in model.modules():
        if isinstance(m, QUANTIZED):
            w = m.weight.detach().flatten(1)
            steps = w / (w.abs().amax(1, keepdim=True) / WEIGHT_LEVELS)
            if not torch.allclose(steps, steps.round(), atol=1e-3):
                return False
    return True


@pytest.fixture(scope="module")
def tiny(tiny_run, digits16):
    from edgeprune.formats import calibration_inputs
    from edgeprune.task import Task

    task = Task.classification_on(digits16, heldout_images=300)
    net = load_checkpoint(tiny_run["weights"]).build().eval()
    x = torch.cat([x for x, _ in digits16.batches("heldout", 100, limit=1)])
    return net, task, calibration_inputs(task, (1, 1, 16, 16)), x


def test_the_simulated_rounding_is_the_int8_file_s(tiny):
    """The fake-quantized model's outputs are closer to the int8 file's (ONNX Runtime) than the
    float model's are; removed, it leaves float weights on their per-channel int8 grid."""
    import copy

    from edgeprune.formats.quantized import QuantizedModel

    net, task, images, x = tiny
    with torch.no_grad():
        fp32, int8 = net(x), QuantizedModel(net, images)(x)
        simulated = copy.deepcopy(net)
        fq = FakeQuantization(simulated)
        fq.calibrate(torch.from_numpy(np.concatenate(images)).split(64))
        sim = simulated(x)
    # the residual sums' rounding is not simulated: here it leaves ~60 % of the float model's distance
    assert (sim - int8).abs().mean() < 0.75 * (fp32 - int8).abs().mean()
    assert not _on_int8_grid(net)
    baked = fq.remove()
    assert _on_int8_grid(baked) and not any("parametrizations" in k for k in baked.state_dict())
    with torch.no_grad():  # the weights' rounding now baked in: only the inputs' rounding is gone
        assert (baked(x) - fp32).abs().mean() < (fp32 - int8).abs().mean()


def test_quantization_aware_training_keeps_its_model_only_where_the_file_scores_higher(tiny):
    from edgeprune.pipeline.qat import QatSettings, quantization_aware
    from edgeprune.training import Recipe

    net, task, _, _ = tiny
    said: list[str] = []
    forced = QatSettings(epochs=1, lr=0.005, threshold=-1.0)  # below any loss: it always trains
    outcome = quantization_aware(net, teacher=net, task=task, recipe=Recipe(epochs=3, max_batches_per_epoch=4),
                                 settings=forced, progress=False, log=said.append)  # fmt: skip
    assert outcome.ran and outcome.heldout_int8_after is not None and "quantization-aware epoch" in said[-1]
    assert outcome.kept == (outcome.heldout_int8_after > outcome.heldout_int8)
    assert (outcome.model is net) != outcome.kept and _on_int8_grid(outcome.model) == outcome.kept
    record = outcome.record()
    assert record["epochs"] == 1 and record["threshold"] == -1.0 and "model" not in record
    lenient = quantization_aware(net, teacher=net, task=task, recipe=Recipe(epochs=1),
                                 settings=QatSettings(threshold=1.0), progress=False, log=said.append)  # fmt: skip
    assert not lenient.ran and lenient.model is net and "no quantization-aware finetune" in lenient.summary()


def test_finetune_in_python_says_what_int8_costs(tiny, digits16):
    """`edgeprune.finetune(..., qat=True)`: the result carries the int8 check (here a threshold no
    loss reaches: no QAT, the finetuned model itself); a negative threshold is refused in one line."""
    import copy

    from edgeprune.errors import EdgepruneError
    from edgeprune.pipeline import finetune

    net = tiny[0]
    said: list[str] = []
    r = finetune(copy.deepcopy(net), teacher=net, data=digits16, epochs=1, max_batches=2, qat=True,
                 qat_threshold=1.0, progress=False, log=said.append)  # fmt: skip
    assert r.qat is not None and not r.qat["ran"] and r.qat["threshold"] == 1.0
    assert 0 < r.qat["heldout_int8"] <= 1 and "no quantization-aware finetune" in said[-1]
    with pytest.raises(EdgepruneError, match="--qat-threshold must be at least 0, got -0.5"):
        finetune(copy.deepcopy(net), teacher=net, data=digits16, qat=True, qat_threshold=-0.5, progress=False)
