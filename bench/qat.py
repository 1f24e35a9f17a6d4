"""Quantization-aware finetuning vs post-training quantization, with the control that tells them apart.

    python bench/qat.py RUN [RUN ...] [--images 2000] [--out /tmp/edgeprune-qat]

For each finetuned run (e.g. bench/int8_budgets.py's `*-int8` rows), three int8 files of its
model, each quantized as the export quantizes (256 training images) and scored by ONNX Runtime on
the test images:

- ptq: the finetuned model as it is;
- +1 fp32 epoch: the control, one more distilled epoch at the QAT learning rate without rounding
  (a QAT epoch is also one more epoch of training: this is what that alone gives);
- +1 qat epoch: `finetune --qat`'s epoch through simulated int8 rounding (forced: threshold -1).

QAT recovers quantization loss only by as much as it beats the control. The run folders are only
read; the files go to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path


def int8_accuracy(model, task, out: Path, images: int) -> float:
    """The test accuracy ONNX Runtime computes on the model's int8 file (export's parity pass)."""
    from edgeprune.formats import export_model

    shape = (1, *task.train.inputs(1)[0].shape[1:])
    art = export_model(model.eval(), input_shape=shape, out_dir=out, task=task, accuracy_images=images,
                       formats=["onnx", "onnx-int8"], log=lambda s: None)  # fmt: skip
    return art["onnx-int8"]["parity"]["test_accuracy"]


def row(run_dir: Path, out: Path, images: int) -> str:
    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.pipeline import finetune
    from edgeprune.pipeline.finetune import run_task_data
    from edgeprune.pipeline.qat import QatSettings, quantization_aware
    from edgeprune.runs import RunDir
    from edgeprune.task import make_task
    from edgeprune.training import DistillConfig, Recipe

    run = RunDir(run_dir)
    done = json.loads((run / "finetune.json").read_text())["recipe"]
    data, dense = run_task_data(run), run.dense().build()
    model = load_checkpoint(run / "finetuned.pt").build()
    settings = QatSettings(threshold=-1.0)
    batches = done["max_batches_per_epoch"]
    recipe = Recipe(epochs=1, lr=settings.lr, batch_size=done["batch_size"], max_batches_per_epoch=batches)
    task = make_task(data=data, heldout_images=None, batch_size=recipe.batch_size, distill=DistillConfig())
    ptq = int8_accuracy(model, task, out / run_dir.name / "ptq", images)
    control = finetune(copy.deepcopy(model), teacher=dense, data=data, epochs=1, lr=settings.lr,
                       max_batches=recipe.max_batches_per_epoch, heldout_images=None, progress=False).model  # fmt: skip
    extra = int8_accuracy(control, task, out / run_dir.name / "fp32-epoch", images)
    qat = quantization_aware(copy.deepcopy(model), teacher=dense, task=task, recipe=recipe, settings=settings,
                             progress=False, log=lambda s: None).model  # fmt: skip
    quantized = int8_accuracy(qat, task, out / run_dir.name / "qat-epoch", images)
    return (f"{run_dir.name:42} {ptq:8.2%} {extra:14.2%} {quantized:14.2%} "
            f"{(quantized - extra) * 100:+9.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finetuned run folders")
    ap.add_argument("--images", type=int, default=2000, help="test images the runtime scores")
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgeprune-qat"), help="where the files go")
    args = ap.parse_args()
    print(f"{'run':42} {'ptq':>8} {'+1 fp32 epoch':>14} {'+1 qat epoch':>14} {'qat-ctrl':>9}", flush=True)
    for r in args.runs:
        print(row(r, args.out, args.images), flush=True)


if __name__ == "__main__":
    main()
