"""`finetune --qat`: a short quantization-aware finetune, where int8 costs too much accuracy.

After the finetune, the model's int8 file (quantized as the export will quantize it: the same
256 training images as calibration) and the float model are scored on the held-out images. Where
int8 loses more than `threshold`, the model is finetuned again for `epochs` through simulated
int8 rounding (training/qat.py), and its own int8 file is scored the same way. The finetuned
model is replaced only where that file scores higher: the decision is the shipped file's score,
not the simulation's. The float model it replaces is kept beside it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from edgeprune.checks import POSITIVE, Rule, check_values

CALIBRATION_BATCH = 64  # calibration images per forward pass of the simulation's range pass


@dataclass(frozen=True)
class QatSettings:
    """When a quantization-aware finetune runs and how long: after a finetune whose int8 file
    loses more than `threshold` of the held-out score (0.005: half a point of top-1), `epochs`
    distilled epochs at peak learning rate `lr` (a tenth of the finetune's: the weights move
    within their rounding steps, not across the loss landscape)."""

    epochs: int = 1
    lr: float = 0.005
    threshold: float = 0.005


# the `qat_*` options of a finetune (flags --qat-epochs, ...; a config's finetune: section)
QAT_RULES = {"qat_epochs": POSITIVE, "qat_lr": Rule(float, lo=0, lo_open=True), "qat_threshold": Rule(float, lo=0)}


def qat_settings(**values) -> QatSettings:
    """QatSettings from the `qat_*` options, each checked (one line for the first that is wrong)."""
    check_values({f"qat_{k}": v for k, v in values.items()}, QAT_RULES, where="finetune")
    return QatSettings(**values)


@dataclass
class QatOutcome:
    """What the quantization-aware finetune found and did; `model` is the one to keep."""

    settings: QatSettings
    heldout_fp32: float  # the finetuned float model
    heldout_int8: float  # its int8 file
    ran: bool = False
    heldout_int8_after: float | None = None  # the int8 file of the model finetuned through int8
    heldout_fp32_after: float | None = None
    kept: bool = False
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False)

    def record(self) -> dict:
        """What finetune.json and the checkpoint say of it."""
        out = {k: v for k, v in asdict(self).items() if k not in ("model", "settings")}
        return {**asdict(self.settings), **out, "seconds": round(self.seconds, 1)}

    def summary(self) -> str:
        lost = f"int8 scores {self.heldout_int8:.2%} on the held-out images against {self.heldout_fp32:.2%} in fp32"
        if not self.ran:
            return f"{lost}: it loses no more than {self.settings.threshold:.2%}, so no quantization-aware finetune"
        epochs = self.settings.epochs
        after = f"after {epochs} quantization-aware epoch(s) its int8 file scores {self.heldout_int8_after:.2%}"
        verdict = "kept" if self.kept else "not kept (no better than before)"
        return f"{lost}; {after}: {verdict}"


def quantization_aware(
    model: nn.Module, *, teacher: nn.Module, task, recipe, settings: QatSettings, device: str = "cpu",
    progress: bool = True, log=print,
) -> QatOutcome:  # fmt: skip
    """Score `model` and its int8 file on the held-out images; where int8 loses more than the
    threshold, finetune a copy through int8 rounding and keep it if its int8 file scores higher."""
    from edgeprune.formats.package import calibration_inputs
    from edgeprune.formats.quantized import Int8Runner
    from edgeprune.training.qat import quantization_aware_finetune

    started = time.monotonic()
    sample = next(iter(task.train.inputs(1, input_of=task.input_of)))
    images = calibration_inputs(task, (1, *sample.shape[1:]), log=log)
    as_int8 = Int8Runner(images)
    model = model.cpu().eval()
    outcome = QatOutcome(settings, heldout_fp32=task.score(model), heldout_int8=task.score(as_int8(model)), model=model)
    if outcome.heldout_fp32 - outcome.heldout_int8 <= settings.threshold:
        outcome.seconds = time.monotonic() - started
        return outcome
    log(f"int8 loses {outcome.heldout_fp32 - outcome.heldout_int8:.2%} of the held-out score: "
        f"{settings.epochs} quantization-aware epoch(s)")  # fmt: skip
    calibration = torch.from_numpy(np.concatenate(images)).split(CALIBRATION_BATCH)
    candidate = copy.deepcopy(model)
    qat_recipe = replace(recipe, epochs=settings.epochs, lr=settings.lr)
    quantization_aware_finetune(candidate, teacher=teacher, task=task, recipe=qat_recipe, calibration=list(calibration),
                                device=device, progress=progress)  # fmt: skip
    candidate = candidate.cpu().eval()
    outcome.ran = True
    outcome.heldout_int8_after = task.score(as_int8(candidate))
    outcome.heldout_fp32_after = task.score(candidate)
    outcome.kept = outcome.heldout_int8_after > outcome.heldout_int8
    outcome.model = candidate if outcome.kept else model
    outcome.seconds = time.monotonic() - started
    return outcome
