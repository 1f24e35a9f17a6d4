"""Hold the predictor against the device: measure random plans, compare with the prediction and
with the FLOPs-proportional baseline (dense measured ms x MACs ratio).

Two figures for the table: as calibrated when it was profiled, and re-anchored on the one dense
measurement the FLOPs baseline also uses (on a shared machine the load drifts between the
profile and the check; the anchor removes that common factor, as `prune` does with its
hardware-in-the-loop measurements)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeprune.devices import Device
from edgeprune.latency.interleave import measure_interleaved, rounds_progress
from edgeprune.latency.layers import ModelLayers
from edgeprune.latency.predictor import Predictor, anchor_scale, error_stats
from edgeprune.latency.table import LatencyTable
from edgeprune.progress import progress_bar


def predictor_for(model: nn.Module, input_shape, table: LatencyTable, *, depth: bool = False):
    from edgeprune.pruning import space

    s = space(model, torch.randn(*input_shape), step=table.step or 8, depth=depth)
    return s, Predictor(ModelLayers.from_model(s), table)


def predict(model: nn.Module, example_input, table, plan=None) -> float:
    """The latency `table` predicts for `model` pruned by `plan` (a Plan or its JSON file; default:
    the dense model), in ms."""
    from edgeprune.models.onnx import example_tensor
    from edgeprune.pruning import Plan

    shape = tuple(example_tensor(example_input).shape)
    if not isinstance(table, LatencyTable):
        path, table = table, LatencyTable.load(table)
        table.check_input(shape, path, "profile it at this input size")
    plan = Plan.load(plan) if isinstance(plan, (str, os.PathLike)) else plan
    s, predictor = predictor_for(model, shape, table, depth=bool(plan and plan.drop))
    return predictor.predict(s.counts_of(plan) if plan else s.full_counts())


def check_predictor(
    *,
    model: nn.Module,
    input_shape,
    table: LatencyTable,
    device: Device,
    n: int,
    seed: int = 1,
    mode: str = "uniform",
    depth: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Measure `n` random plans on `device`; prediction error of the table and of the FLOPs baseline.
    With `depth`, the plans may also remove residual blocks."""
    from edgeprune.models.onnx import export_onnx
    from edgeprune.pruning import random_counts

    # said first: building the space and exporting n + 1 models take seconds before the first round
    plans_text = f"{n} random plan{'s' * (n != 1)}"
    log(f"checking the table against {device.name}: the dense model and {plans_text}, exported and measured ...")
    s, predictor = predictor_for(model, input_shape, table, depth=depth)
    dense_predicted = predictor.predict()
    rng = np.random.default_rng(seed)
    plans = [random_counts(s, rng, mode=mode) for _ in range(n)]
    with tempfile.TemporaryDirectory() as d:
        # the dense model (the anchor: dense *now*) and the plans in turn, each its quietest window
        with progress_bar(enabled=progress) as bar:  # a second or more each: seconds in all
            task = bar.add_task(f"exporting the dense model and {plans_text}", total=n + 1, status="models")
            items = [(export_onnx(model, input_shape, Path(d) / "dense.onnx"), input_shape)]
            bar.advance(task)
            for i, counts in enumerate(plans):
                pruned = s.plan(counts).apply(model)
                items.append((export_onnx(pruned, input_shape, Path(d) / f"p{i}.onnx"), input_shape))
                bar.advance(task)
        # the progress counts rounds (each measures every model once), not plans
        what = f"measuring the dense model and {plans_text} on {device.name}"
        with rounds_progress(what, len(items), enabled=progress) as shown:
            dense, *ms = measure_interleaved(device, items, on_result=shown)
    dense_ms = dense.median_ms
    rows = [
        {
            "counts": counts,
            "measured_ms": m.median_ms,
            "predicted_ms": predictor.predict(counts),
            "flops_ms": dense_ms * s.macs(counts) / s.macs(),
            "steady": m.extra.get("steady"),  # every window's runs pooled: median, p90, spread over the quietest
        }
        for counts, m in zip(plans, ms)
    ]
    measured = [r["measured_ms"] for r in rows]
    # the same one dense measurement the FLOPs baseline uses
    anchor = anchor_scale(table, s.full_counts(), dense_ms, dense_predicted)
    return {
        "device": device.name,
        "dense_ms": dense_ms,
        "dense_predicted_ms": dense_predicted,
        "anchor": anchor,
        "table": error_stats([r["predicted_ms"] for r in rows], measured),
        "table_anchored": error_stats([r["predicted_ms"] * anchor for r in rows], measured),
        "flops_baseline": error_stats([r["flops_ms"] for r in rows], measured),
        "plans": rows,
    }
