"""The `edgeprune` command: parses arguments, calls the library, prints results.

Every verb is a thin face of a library function; errors the user can fix print one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edgeprune.errors import EdgepruneError

app = typer.Typer(
    name="edgeprune",
    help="Prune CNNs to a millisecond budget measured on the target device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command()
def models() -> None:
    """List model names: built-ins for small inputs, then torchvision classifiers."""
    from edgeprune.models import BUILTINS, list_models

    for name in list_models():
        out.print(f"{name}\t{'built-in' if name in BUILTINS else 'torchvision'}")


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Model name (see `edgeprune models`).")],
    data: Annotated[str, typer.Option(help="fashion-mnist, digits, cifar10[:PATH] or imagefolder:PATH.")],
    out_path: Annotated[Path, typer.Option("--out", help="Checkpoint file to write.")],
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule to 0).")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (not applied to BN and biases).")] = 5e-4,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up epochs.")] = 0.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, batch order and augmentation.")] = 0,
    max_batches: Annotated[int | None, typer.Option(help="Batches per epoch, for smoke runs.")] = None,
    data_root: Annotated[str | None, typer.Option(help="Folder of the data set files.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    restart: Annotated[bool, typer.Option(help="Ignore an interrupted run's resume file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train a model with SGD + cosine schedule; rerun the same command to resume an interrupted run."""
    from edgeprune.training import Recipe
    from edgeprune.training import train as train_fn

    _threads(threads)
    recipe = Recipe(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        seed=seed,
        max_batches_per_epoch=max_batches,
    )
    ckpt = train_fn(model=model, data=data, out=out_path, recipe=recipe, restart=restart, data_root=data_root)
    result = {
        "checkpoint": str(out_path),
        "model": model,
        "data": ckpt.dataset,
        "test_accuracy": ckpt.meta["test_accuracy"],
        "heldout_accuracy": ckpt.meta["heldout_accuracy"],
    }
    if json_out:
        print(json.dumps(result))
    else:
        out.print(
            f"wrote {out_path}: test accuracy {result['test_accuracy']:.2%}, held-out {result['heldout_accuracy']:.2%}"
        )


@app.command()
def run(
    keep_ratio: Annotated[float, typer.Option(help="Share of channels kept in every group.")] = 0.5,
    finetune_epochs: Annotated[int, typer.Option(help="Finetune epochs after pruning.")] = 1,
    weights: Annotated[str | None, typer.Option(help="Base checkpoint (default: the shipped resnet20).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run directories are created.")] = Path("runs"),
    data_root: Annotated[str | None, typer.Option(help="Folder of the data set files.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run the quickstart: shipped resnet20 on Fashion-MNIST, pruned, exported, measured with ONNX Runtime."""
    import torch

    from edgeprune.pipeline import QuickstartConfig, run_quickstart
    from edgeprune.zoo import resolve_weights

    torch.set_num_threads(2)
    cfg = QuickstartConfig(keep_ratio=keep_ratio, finetune_epochs=finetune_epochs)
    if weights:
        cfg = QuickstartConfig(**{**cfg.__dict__, "checkpoint": str(resolve_weights(weights))})
    log = (lambda s: err.print(s, highlight=False)) if json_out else (lambda s: out.print(s, highlight=False))
    result = run_quickstart(config=cfg, runs_root=runs_dir, data_root=data_root, log=log)
    if json_out:
        print(json.dumps(result, default=str))
        return
    table = Table(
        title=f"{result['model']} on {result['dataset']}, ONNX Runtime ({result['device']['cpu']}, "
        f"{result['device']['threads']} thread)"
    )
    for col in ("model", "params", "test accuracy", "median ms", "p90 ms", "speedup"):
        table.add_column(col, justify="right")
    for name in ("dense", "pruned"):
        r = result[name]
        speed = 1.0 if name == "dense" else result["speedup"]
        table.add_row(
            name,
            f"{r['params']:,}",
            f"{r['test_accuracy']:.2%}",
            f"{r['latency']['median_ms']:.3f}",
            f"{r['latency']['p90_ms']:.3f}",
            f"{speed:.2f}x",
        )
    out.print(table)
    out.print(f"run directory: {result['run_dir']} ({result['seconds']:.0f} s)")


def main() -> None:
    try:
        app()
    except EdgepruneError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
