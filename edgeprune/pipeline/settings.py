"""The prune settings, defined once: their defaults, help and checks serve the Python API, the
CLI's options (generated from them) and the config files' `prune:` section alike."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from edgeprune.checks import check_value, flag
from edgeprune.errors import EdgepruneError

__all__ = ["PruneSettings", "check_value", "flag", "setting"]


def setting(
    default: Any,
    help: str,
    *,
    kind: type = int,
    lo=None,
    hi=None,
    lo_open=False,
    hi_open=False,
    choices: tuple[str, ...] = (),
    optional: bool = False,
):
    """A field with what the CLI and the checks need: its help, type and range."""
    meta = {
        "help": help,
        "kind": kind,
        "lo": lo,
        "hi": hi,
        "lo_open": lo_open,
        "hi_open": hi_open,
        "choices": choices,
        "optional": optional,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _searchers() -> tuple[str, ...]:
    return ("uniform", "random", "bo", "bocr", "pso", "knapsack", "darts")


PRECISIONS = ("device", "int8", "auto")


def _criteria() -> tuple[str, ...]:
    return ("l1", "l2", "bn", "reprune", "acp")


@dataclass
class PruneSettings:
    """How a pruning run searches (everything but the model, data, device, budget and table)."""

    search: str = setting(
        "knapsack", "Searcher: uniform, random, bo, bocr, pso, knapsack or darts.", kind=str, choices=_searchers()
    )
    precision: str = setting(
        "device",
        "Precision the model ships in: device (the device profile's), int8 (quantized; searched on the device's "
        "int8 table, each candidate scored as its int8 file runs) or auto (both, keeping the more accurate plan "
        "that meets the budget). A share-of-dense budget is always of the dense model at the device's precision.",
        kind=str,
        choices=PRECISIONS,
    )
    evals: int = setting(60, "Distinct plans to score.", lo=1)
    seed: int = setting(0, "Seed of the searcher and of the proxy's batches.", lo=0)
    cost: str = setting(
        "latency", "Constraint: latency (the table) or flops (the baseline).", kind=str, choices=("latency", "flops")
    )
    flops_target: float | None = setting(
        None,
        "MACs share for --cost flops (default: budget / dense ms).",
        kind=float,
        lo=0,
        hi=1,
        lo_open=True,
        optional=True,
    )
    criterion: str = setting(
        "l2", "Channels kept in a group: l1, l2, bn, reprune or acp.", kind=str, choices=_criteria()
    )
    clusters: int = setting(4, "bocr: clusters of groups sharing a keep ratio.", lo=1)
    particles: int = setting(10, "pso: swarm size.", lo=2)
    knapsack_rounds: int = setting(
        0,
        "knapsack: rounds of pruning while training (HALP's progressive schedule), the saliency re-estimated "
        "after each; 0: one shot on the dense model's saliency.",
        lo=0,
    )
    warm_start: str = setting(
        "none",
        "bo, bocr and pso: knapsack starts the search from the one-shot knapsack's plans (its plan and a "
        "neighbour, seconds), in place of as many of its own starting points; none: its own only.",
        kind=str,
        choices=("none", "knapsack"),
    )
    min_keep: float = setting(0.1, "Smallest keep ratio of any group.", kind=float, lo=0, hi=1, lo_open=True)
    max_keep: float = setting(1.0, "Largest keep ratio of any group.", kind=float, lo=0, hi=1, lo_open=True)
    depth: bool = setting(False, "Also remove whole residual blocks (reaches budgets width pruning cannot).", kind=bool)
    fix: list[str] = setting([], "Group root layer (glob) held at full width; repeatable.", kind=list)
    calibration_batches: int = setting(10, "Training batches that re-estimate BatchNorm for each candidate.", lo=1)
    heldout_images: int = setting(2000, "Held-out images the proxy scores (classification).", lo=1)
    proxy: str = setting(
        "bn",
        "Accuracy proxy: bn (the plan on the dense weights, BatchNorm recalibrated) or supernet (a width "
        "supernet trained once, SP's, sliced by the plan, then the same).",
        kind=str,
        choices=("bn", "supernet"),
    )
    supernet_steps: int = setting(300, "supernet: training steps (sandwich rule, distilled, stage by stage).", lo=1)
    proxy_steps: int = setting(
        0,
        "Distilled SGD steps each candidate trains before it is scored (0: BatchNorm "
        "recalibration only); ranks by what a finetune recovers.",
        lo=0,
    )
    batch: int | None = setting(
        None,
        "Candidates proposed and scored at once (q; BO/BOCR choose them jointly); default: one per worker "
        "(1 without --workers/--ray).",
        lo=1,
        optional=True,
    )
    measure_top: int = setting(5, "Candidates measured on the device per round.", lo=1)
    max_rounds: int = setting(
        4,
        "Search rounds after the first (budget tightened after measured misses, or loosened once); may grow on resume.",
        lo=0,
    )
    anchor: bool = setting(
        True, "Scale the table's predictions by the dense model measured now / at the profile.", kind=bool
    )
    margin: float = setting(
        0.02,
        "Share under the budget the chosen plan must measure (run-to-run noise).",
        kind=float,
        lo=0,
        hi=0.5,
        hi_open=True,
    )
    loosen: float = setting(
        0.05,
        "Where the chosen plan measures more than this share under the target, search "
        "one round more at a looser budget (0: never).",
        kind=float,
        lo=0,
        hi=1,
        hi_open=True,
    )

    GROWABLE = ("evals", "max_rounds")  # what a resumed run may raise

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def create(cls, values: dict | None = None, *, where: str = "prune", as_flag: bool = True) -> PruneSettings:
        """Settings from `values` (unknown names refused, each value checked), defaults for the rest."""
        values = {k: v for k, v in (values or {}).items() if v is not None}
        unknown = set(values) - cls.names()
        if unknown:
            raise EdgepruneError(
                f"unknown {where} setting(s) {sorted(unknown)}; known: {', '.join(sorted(cls.names()))}"
            )
        checked = {
            f.name: check_value(f.name, values[f.name], f.metadata, as_flag=as_flag)
            for f in fields(cls)
            if f.name in values
        }
        settings = cls(**checked)
        if settings.max_keep < settings.min_keep:
            raise EdgepruneError(f"--max-keep ({settings.max_keep}) is below --min-keep ({settings.min_keep})")
        return settings

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(cls)}
