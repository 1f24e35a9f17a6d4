"""Finetune a pruned model distilled from its dense parent: model in, model out.

`finetune(model, teacher=dense, data=... | score_fn=..., train_data=...)` trains the pruned
model for `epochs` (cosine schedule, SGD), distilled from the dense one with the task's loss,
and returns the best epoch by held-out score. `finetune_run(RUN)` does the same for a run
folder: RUN/pruned.pt distilled from RUN/dense.pt into RUN/finetuned.pt (the best epoch so far,
always) and RUN/finetune.json; rerunning it resumes an interrupted finetune, a finished one is
not repeated. With `qat`, a quantization-aware finetune follows where int8 loses too much
(pipeline/qat.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

from torch import nn

from edgeprune.checks import POSITIVE, POSITIVE_OR_NONE, Rule, check_torch_device, check_values
from edgeprune.errors import EdgepruneError
from edgeprune.pipeline.qat import QAT_RULES, QatSettings, qat_settings, quantization_aware
from edgeprune.runs import RunDir, write_json, writes_run


def finetune(
    model: nn.Module,
    *,
    teacher: nn.Module,
    data=None,
    score_fn=None,
    train_data=None,
    loss_fn=None,
    input_fn=None,
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 128,
    temperature: float = 4.0,
    alpha: float = 0.9,
    seed: int = 0,
    max_batches: int | None = None,
    heldout_images: int | None = None,
    device: str = "cpu",
    store=None,
    qat: bool = False,
    qat_epochs: int = 1,
    qat_lr: float = 0.005,
    qat_threshold: float = 0.005,
    progress: bool = True,
    log=print,
):
    """Distil `teacher` into `model` for `epochs`, training `model` in place; returns a
    FinetuneResult (`.model`: it, with the best epoch's weights). `data` (classification) or
    `score_fn` + `train_data` (+ `loss_fn`): see edgeprune.task. `store`: where the best weights
    and the resume point live (default: memory). `qat`: then, where its int8 file loses more than
    `qat_threshold` of the held-out score, `qat_epochs` quantization-aware epochs (pipeline/qat.py;
    `.qat` says what they found, `.model` is the one to ship)."""
    from edgeprune.task import make_task
    from edgeprune.training import DistillConfig, Recipe, finetune_model

    check_options(epochs=epochs, lr=lr, batch_size=batch_size, temperature=temperature, alpha=alpha, seed=seed)
    check_options(max_batches=max_batches, device=device)
    settings = qat_settings(epochs=qat_epochs, lr=qat_lr, threshold=qat_threshold) if qat else None
    distill = DistillConfig(temperature=temperature, alpha=alpha)
    task = make_task(
        data=data,
        score_fn=score_fn,
        train_data=train_data,
        loss_fn=loss_fn,
        input_fn=input_fn,
        heldout_images=heldout_images,
        batch_size=batch_size,
        distill=distill,
    )
    recipe = Recipe(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, max_batches_per_epoch=max_batches)
    result = finetune_model(
        model, teacher=teacher, task=task, recipe=recipe, store=store, device=device, progress=progress
    )
    if settings is not None:
        outcome = quantization_aware(result.model, teacher=teacher, task=task, recipe=recipe, settings=settings,
                                     device=device, progress=progress, log=log)  # fmt: skip
        log(outcome.summary())
        result.model, result.qat = outcome.model, outcome.record()
    return result


# what each finetune option may be: the CLI's options, a config's finetune: section and the
# Python keywords are checked by these, before any model is loaded
RULES = {
    "epochs": POSITIVE,
    "lr": Rule(float, lo=0, lo_open=True),
    "batch_size": POSITIVE,
    "temperature": Rule(float, lo=0, lo_open=True),
    "alpha": Rule(float, lo=0, hi=1),
    "seed": Rule(int, lo=0),  # numpy's and torch's generators take no negative seed
    "max_batches": POSITIVE_OR_NONE,
    "heldout_limit": POSITIVE_OR_NONE,
    "device": Rule(str),
    "qat": Rule(bool),
    **QAT_RULES,
}


def check_options(**options) -> None:
    """The finetune's options, each checked by its rule (one line for the first that is wrong)."""
    check_values(options, RULES, where="finetune")
    if "device" in options:
        check_torch_device(options["device"])


def run_task_data(run: RunDir):
    """The run's data set (a run started from Python with a score_fn has none the CLI can load)."""
    from edgeprune.data import load_dataset

    config = run.config
    if config.get("task") == "custom" or not config.get("data"):
        raise EdgepruneError(
            f"{run} was pruned from Python with its own score_fn: continue it in Python "
            "(edgeprune.finetune / export / validate take the models and your functions)"
        )
    return load_dataset(config["data"], root=config.get("data_root"), options=config.get("data_options"))


@writes_run
def finetune_run(
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
    qat: bool = False,
    qat_epochs: int = 1,
    qat_lr: float = 0.005,
    qat_threshold: float = 0.005,
    progress: bool = True,
    log=print,
) -> dict:
    """`finetune` on a run folder (see the module's docstring); returns finetune.json. `qat`: then
    the quantization-aware finetune where int8 loses too much (pipeline/qat.py), once."""
    from edgeprune.checkpoint import load_checkpoint
    from edgeprune.training import CheckpointStore, DistillConfig, Recipe, resume_position

    check_options(epochs=epochs, lr=lr, batch_size=batch_size, temperature=temperature, alpha=alpha, seed=seed)
    check_options(max_batches=max_batches, heldout_limit=heldout_limit, device=device)
    settings = qat_settings(epochs=qat_epochs, lr=qat_lr, threshold=qat_threshold) if qat else None
    run = RunDir(run_dir)
    student, dense = run.pruned(), run.dense()
    if (run / "finetuned.pt").is_file():  # a finetune to resume or report must be of this run's model
        run.check_lineage("finetuned.pt", load_checkpoint(run / "finetuned.pt"))
    data = run_task_data(run)
    recipe = Recipe(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, max_batches_per_epoch=max_batches)
    distill = DistillConfig(temperature=temperature, alpha=alpha)
    store = CheckpointStore(run / "finetuned.pt", student, recipe, distill)
    if (done := store.finished()) is not None:
        previous = done.meta.get("finetune_recipe", {})
        if (previous.get("epochs"), previous.get("lr")) != (epochs, lr):
            raise EdgepruneError(
                f"{run / 'finetuned.pt'} was finetuned with another recipe ({previous.get('epochs')} epochs, "
                f"lr {previous.get('lr')}); delete it to finetune again"
            )
    started = time.monotonic()
    log(f"finetuning {student.ref.id} ({run}) for {epochs} epochs, distilled from its dense model")
    if (position := resume_position(store.state_file, recipe)) is not None:
        done_epochs, batch = position
        where = f"{done_epochs} of {epochs} epochs done, then {batch} batches of the next"
        log(f"resuming where it was interrupted: {where}")
    if done is None:
        result = finetune(
            student.build(),
            teacher=dense.build(),
            data=data,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            temperature=temperature,
            alpha=alpha,
            seed=seed,
            max_batches=max_batches,
            heldout_images=None if heldout_limit is None else 500 * heldout_limit,  # batches of 500
            device=device,
            store=store,
            progress=progress,
        )
        from edgeprune.training import accuracy

        store.finish(
            result.model,
            {
                "test_accuracy": accuracy(result.model, data, "test", device=device),
                "heldout_accuracy": result.score,
                "teacher_test_accuracy": run.recorded_dense_accuracy(dense),
            },
        )
        done = load_checkpoint(run / "finetuned.pt")
    if settings is not None:
        done = _qat_run(run, done, dense, data, settings, store, heldout_limit, device, progress, log)
    return _record(run, done, dense, data, epochs, device, time.monotonic() - started)


def _record(run: RunDir, best, dense, data, epochs: int, device: str, seconds: float) -> dict:
    from edgeprune.training import accuracy

    history = best.meta["history"]
    result = {
        "run_dir": str(run),
        "checkpoint": str(run / "finetuned.pt"),
        "epochs": epochs,
        "recipe": best.meta["finetune_recipe"],
        "distillation": best.meta["distillation"],
        "best_epoch": best.meta["best_epoch"],
        "heldout_accuracy_before": history[0]["score"],
        "heldout_accuracy": best.meta["heldout_accuracy"],
        "test_accuracy": best.meta["test_accuracy"],
        "dense_test_accuracy": run.recorded_dense_accuracy(dense),
        "history": history,
        "qat": best.meta.get("qat"),
        "device": device,
        "seconds": round(seconds, 1),
    }
    if result["dense_test_accuracy"] is None:
        result["dense_test_accuracy"] = accuracy(dense.build(), data, "test")
    write_json(run / "finetune.json", result)
    return result


def _qat_run(run: RunDir, done, dense, data, settings: QatSettings, store, heldout_limit, device, progress, log):
    """The quantization-aware finetune of a finished one (once per setting), always from the model
    the finetune made: finetuned.pt replaced where its int8 file scores higher, that model kept as
    finetuned-before-qat.pt while it is replaced."""
    from edgeprune.checkpoint import load_checkpoint, save_checkpoint
    from edgeprune.task import make_task
    from edgeprune.training import accuracy

    previous = done.meta.get("qat")
    if previous is not None and all(previous.get(k) == v for k, v in asdict(settings).items()):
        log(f"quantization-aware finetune already done: {previous['summary']}")
        return done
    before = run / "finetuned-before-qat.pt"  # a QAT with other settings starts where the first did
    base = load_checkpoint(before) if before.is_file() else done
    recipe, distill = store.recipe, store.distill
    heldout = None if heldout_limit is None else 500 * heldout_limit
    task = make_task(data=data, heldout_images=heldout, batch_size=recipe.batch_size, distill=distill)
    outcome = quantization_aware(base.build(), teacher=dense.build(), task=task, recipe=recipe, settings=settings,
                                 device=device, progress=progress, log=log)  # fmt: skip
    log(outcome.summary())
    meta = {k: base.meta.get(k) for k in ("test_accuracy", "heldout_accuracy", "teacher_test_accuracy")}
    if outcome.kept:
        if not before.is_file():
            save_checkpoint(base, before)
        meta.update(test_accuracy=accuracy(outcome.model, data, "test", device=device),
                    heldout_accuracy=outcome.heldout_fp32_after)  # fmt: skip
    store.history, store.best_epoch = base.meta["history"], base.meta["best_epoch"]
    store.finish(outcome.model, {**meta, "qat": {**outcome.record(), "summary": outcome.summary()}})
    if not outcome.kept:
        before.unlink(missing_ok=True)  # finetuned.pt is that model again
    return load_checkpoint(run / "finetuned.pt")
