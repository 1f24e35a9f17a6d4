"""Finetune a pruning run's chosen plan, distilled from the dense model it was pruned from.

Reads RUN/pruned.pt (written by prune) and the dense checkpoint named in RUN/config.json; writes
RUN/finetuned.pt (the best epoch by held-out accuracy) and RUN/finetune.json. Rerunning the same
command resumes an interrupted finetune; a finished one is not repeated.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.runs import write_json


def finetune(
    run_dir: str | os.PathLike,
    *,
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 128,
    temperature: float = 4.0,
    alpha: float = 0.9,
    seed: int = 0,
    max_batches: int | None = None,
    heldout_limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    log=print,
) -> dict:
    """Distil the dense model into the run's pruned plan for `epochs` (cosine schedule from `lr`)."""
    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.data import load_dataset
    from edgeprune.training import DistillConfig, Recipe, accuracy, finetune_checkpoint, resume_path, resume_position
    from edgeprune.zoo import resolve_weights

    run = Path(run_dir)
    if not (run / "pruned.pt").is_file():
        raise EdgepruneError(f"{run} has no pruned.pt: run `edgeprune prune --out {run}` first")
    if epochs < 1:
        raise EdgepruneError(f"--epochs must be at least 1, got {epochs}")
    config = json.loads((run / "config.json").read_text())
    teacher = load_checkpoint(resolve_weights(config["weights"]))
    student = load_checkpoint(run / "pruned.pt")
    data = load_dataset(config.get("data") or teacher.dataset, root=config.get("data_root"))
    recipe = Recipe(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, max_batches_per_epoch=max_batches)
    distill = DistillConfig(temperature=temperature, alpha=alpha)
    out = run / "finetuned.pt"
    if out.is_file():
        done = load_checkpoint(out).meta
        if done.get("finished"):
            previous = done.get("finetune_recipe", {})
            if (previous.get("epochs"), previous.get("lr")) != (epochs, lr):
                raise EdgepruneError(
                    f"{out} was finetuned with another recipe ({previous.get('epochs')} epochs, "
                    f"lr {previous.get('lr')}); delete it to finetune again"
                )
    started = time.monotonic()
    log(f"finetuning {student.model} ({run}) for {epochs} epochs, distilled from {config['weights']}")
    if (position := resume_position(resume_path(out), recipe)) is not None:
        done, batch = position
        log(f"resuming where it was interrupted: {done} of {epochs} epochs done, then {batch} batches of the next")
    best = finetune_checkpoint(
        student=student,
        teacher=teacher,
        data=data,
        out=out,
        recipe=recipe,
        distill=distill,
        heldout_limit=heldout_limit,
        device=device,
        progress=progress,
    )
    before = best.meta["history"][0]["heldout_accuracy"]
    result = {
        "run_dir": str(run),
        "checkpoint": str(out),
        "epochs": epochs,
        "recipe": best.meta["finetune_recipe"],
        "distillation": best.meta["distillation"],
        "best_epoch": best.meta["best_epoch"],
        "heldout_accuracy_before": before,
        "heldout_accuracy": best.meta["heldout_accuracy"],
        "test_accuracy": best.meta["test_accuracy"],
        "dense_test_accuracy": teacher.meta.get("test_accuracy"),
        "history": best.meta["history"],
        "device": device,
        "seconds": round(time.monotonic() - started, 1),
    }
    if result["dense_test_accuracy"] is None:
        result["dense_test_accuracy"] = accuracy(teacher.build(), data, "test")
    write_json(run / "finetune.json", result)
    return result
