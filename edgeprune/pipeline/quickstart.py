"""The quickstart: shipped resnet20 -> uniform pruning -> ONNX -> measured latency and accuracy.

It is the pipeline's frame: each stage (prune, finetune, export, measure) is a call into its
own module, to be replaced by the full versions (budgeted search, distillation, device agent).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from edgeprune.backends import OnnxRuntimeBackend
from edgeprune.checkpoint import load_checkpoint
from edgeprune.data import load_dataset
from edgeprune.export import export_onnx
from edgeprune.latency import Protocol
from edgeprune.pruning import prune_uniform
from edgeprune.runs import new_run_dir, write_json
from edgeprune.training import Recipe, accuracy, fit, recalibrate_bn
from edgeprune.zoo import shipped_checkpoint


@dataclass(frozen=True)
class QuickstartConfig:
    checkpoint: str = str(shipped_checkpoint("resnet20", "fashion-mnist"))
    keep_ratio: float = 0.5
    step: int = 8
    finetune_epochs: int = 1
    finetune_lr: float = 0.02
    threads: int = 1  # latency is measured with one thread: stable on a shared machine
    test_batches: int | None = None  # limit the test split (smoke runs)
    finetune_batches: int | None = None


def run_quickstart(
    *,
    config: QuickstartConfig | None = None,
    runs_root: str | os.PathLike = "runs",
    data_root: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the quickstart pipeline; returns (and writes to the run directory) the results table."""
    cfg = config or QuickstartConfig()
    run_dir = new_run_dir(runs_root, "quickstart")
    write_json(run_dir / "config.json", asdict(cfg))
    t0 = time.monotonic()

    ckpt = load_checkpoint(cfg.checkpoint)
    data = load_dataset(ckpt.dataset, root=data_root)
    dense = ckpt.build()
    shape = (1, *ckpt.input_shape)
    log(f"[1/4] loaded {ckpt.model} ({ckpt.dataset}) from {cfg.checkpoint}")

    pruned = prune_uniform(dense, torch.randn(shape), keep_ratio=cfg.keep_ratio, step=cfg.step)
    recalibrate_bn(pruned, data)
    if cfg.finetune_epochs:
        recipe = Recipe(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, max_batches_per_epoch=cfg.finetune_batches)
        fit(pruned, data, recipe, progress=progress, description="finetune pruned")
    log(
        f"[2/4] pruned every group to {cfg.keep_ratio:.0%} of its channels and finetuned {cfg.finetune_epochs} epoch(s)"
    )

    paths = {
        name: export_onnx(m, shape, run_dir / f"{name}.onnx") for name, m in (("dense", dense), ("pruned", pruned))
    }
    log(f"[3/4] exported ONNX to {run_dir}")

    backend = OnnxRuntimeBackend(threads=cfg.threads)
    rows = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        m = backend.measure(paths[name], shape, Protocol())
        rows[name] = {
            "test_accuracy": accuracy(model, data, "test", limit=cfg.test_batches),
            "params": sum(p.numel() for p in model.parameters()),
            "latency": m.to_dict(),
            "onnx": str(paths[name]),
        }
    log(f"[4/4] measured latency on onnxruntime ({cfg.threads} thread) and test accuracy")
    result = {
        "run_dir": str(run_dir),
        "model": ckpt.model,
        "dataset": ckpt.dataset,
        "device": backend.fingerprint(),
        "protocol": Protocol().to_dict(),
        "dense": rows["dense"],
        "pruned": rows["pruned"],
        "speedup": rows["dense"]["latency"]["median_ms"] / rows["pruned"]["latency"]["median_ms"],
        "seconds": round(time.monotonic() - t0, 1),
    }
    write_json(run_dir / "results.json", result)
    return result
