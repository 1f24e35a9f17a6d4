"""Channel criteria side by side: accuracy right after pruning (BN recalibrated), no finetuning.

    python bench/criteria.py [--weights zoo:resnet56-fashion-mnist] [--removal 0.5 0.7]

Every criterion prunes the same share of channels from every group of the same trained model;
BatchNorm statistics are recalibrated on training batches; accuracy is measured on the held-out
split (what a search would score) and on the test split.
"""

from __future__ import annotations

import argparse
import time

import torch

from edgeprune.checkpoint import load_checkpoint
from edgeprune.data import load_dataset
from edgeprune.pruning import CRITERIA, space
from edgeprune.training import accuracy, recalibrate_bn
from edgeprune.zoo import resolve_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="zoo:resnet56-fashion-mnist")
    ap.add_argument("--removal", type=float, nargs="+", default=[0.5, 0.7], help="share of channels removed")
    ap.add_argument("--step", type=int, default=1, help="channel step (1: the exact share in every group)")
    ap.add_argument("--calib-batches", type=int, default=20)
    ap.add_argument("--acp-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = load_checkpoint(resolve_weights(args.weights))
    data = load_dataset(ckpt.dataset)
    model = ckpt.build()
    s = space(model, torch.randn(1, *ckpt.input_shape), step=args.step, min_keep_ratio=0.05)
    acp_data = [x for x, _ in data.batches("train", 64, train=False, limit=args.acp_batches)]
    dense = (accuracy(model, data, "heldout"), accuracy(model, data, "test"))
    print(f"{ckpt.model} on {ckpt.dataset}: {len(s.groups)} groups, dense held-out {dense[0]:.2%} test {dense[1]:.2%}")
    print(f"{'criterion':<10}" + "".join(f" | removed {r:.0%}: held-out   test   MACs  sel.s" for r in args.removal))
    for name in CRITERIA:
        cells = []
        for removal in args.removal:
            t0 = time.perf_counter()
            kw = {"data": acp_data} if name == "acp" else {}
            counts = s.counts_from_ratios(1.0 - removal)
            plan = s.plan(counts, criterion=name, **kw)
            seconds = time.perf_counter() - t0
            pruned = plan.apply(model)
            recalibrate_bn(pruned, data, batches=args.calib_batches)
            ho, te = accuracy(pruned, data, "heldout"), accuracy(pruned, data, "test")
            cells.append(f" | {'':>11}{ho:>9.2%} {te:>6.2%} {s.macs(counts) / s.macs():>5.0%} {seconds:>6.1f}")
        print(f"{name:<10}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
