"""Export a run's model (finetuned if it was, else as pruned) and write the manifest.

manifest.json lists every file with its hash, the input shape, the plan, the accuracy (PyTorch
and each runtime's own on the test split), each file's parity with PyTorch, and the latency
figures known so far (predicted and measured during the search; `validate` adds its measurement
on the device under "validation"). A file that fails parity fails the export.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.runs import write_json


def run_model_checkpoint(run: Path):
    """The run's model to ship: finetuned.pt when finetuning finished, else pruned.pt."""
    from edgeprune.checkpoint import load_checkpoint

    for name in ("finetuned.pt", "pruned.pt"):
        if (run / name).is_file():
            ckpt = load_checkpoint(run / name)
            if name == "pruned.pt" or ckpt.meta.get("finished"):
                return run / name, ckpt
    raise EdgepruneError(f"{run} has no pruned.pt: run `edgeprune prune --out {run}` first")


def export_run(
    run_dir: str | os.PathLike,
    *,
    formats: str | list[str] = "onnx",
    out: str | os.PathLike | None = None,
    tensorrt_precision: str = "fp16",
    accuracy_images: int | None = None,
    log=print,
) -> dict:
    from edgeprune.backends import TensorRtBackend
    from edgeprune.backends.tensorrt import MISSING
    from edgeprune.data import load_dataset
    from edgeprune.export import export_model, parity_failures, parse_formats
    from edgeprune.training import accuracy

    run = Path(run_dir)
    fmts = parse_formats(formats)
    if accuracy_images is not None and accuracy_images < 1:
        raise EdgepruneError(f"--accuracy-images must be at least 1, got {accuracy_images}")
    if "tensorrt" in fmts and not TensorRtBackend.available():
        raise EdgepruneError(MISSING)  # before any work: nothing half-exported
    source, ckpt = run_model_checkpoint(run)
    config = json.loads((run / "config.json").read_text())
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
    data = load_dataset(ckpt.dataset, root=config.get("data_root"))
    model = ckpt.build()
    shape = (1, *ckpt.input_shape)
    target = Path(out) if out else Path("export") / run.name
    started = time.monotonic()
    log(f"exporting {source} ({', '.join(fmts)}) to {target}")
    artifacts = export_model(
        model,
        input_shape=shape,
        out_dir=target,
        formats=fmts,
        data=data,
        tensorrt_precision=tensorrt_precision,
        accuracy_images=accuracy_images,
        log=log,
    )
    chosen = results.get("chosen", {})
    manifest = {
        "model": ckpt.model,
        "dataset": ckpt.dataset,
        "source": str(source),
        "run_dir": str(run),
        "input_shape": list(shape),
        "input": {"name": "input", "dtype": "float32", "mean": list(data.mean), "std": list(data.std)},
        "plan": ckpt.plan,
        "formats": {k: {kk: vv for kk, vv in v.items()} for k, v in artifacts.items()},
        "accuracy": {
            "pytorch_test": ckpt.meta.get("test_accuracy") or accuracy(model, data, "test"),
            **{
                f"{k}_test": v["parity"]["test_accuracy"]
                for k, v in artifacts.items()
                if "test_accuracy" in v.get("parity", {})
            },
        },
        "latency": {
            "device": results.get("device"),
            "budget_ms": results.get("budget_ms"),
            "predicted_ms": chosen.get("predicted_ms"),
            "measured_ms_during_search": chosen.get("measured_ms"),
            "dense_measured_ms": results.get("dense", {}).get("measured_ms"),
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    write_json(target / "manifest.json", manifest)
    failed = parity_failures(artifacts)
    if failed:  # the files and the manifest stay for a look; the run is not marked exported
        previous = run / "export.json"
        try:
            stale = Path(json.loads(previous.read_text())["out"]).resolve() == target.resolve()
        except (OSError, ValueError, KeyError, TypeError):
            stale = previous.is_file()  # unreadable: it cannot name anything valid either
        if stale:
            previous.unlink()  # it named the files just overwritten
        raise EdgepruneError(
            f"the export fails parity with PyTorch ({'; '.join(failed)}): the file computes something else "
            f"than the model, do not ship it; the files and manifest.json are in {target}"
        )
    write_json(run / "export.json", {"out": str(target), "manifest": str(target / "manifest.json")})
    return manifest
