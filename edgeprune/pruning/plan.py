"""A plan: the exact channels kept in each group. Applied to the base model it gives the pruned model.

Small JSON (root layer name -> kept indices, and the residual blocks removed whole, if any); a
pruned checkpoint is base model id + plan + state dict, rebuilt without unpickling modules.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.pruning.blocks import remove_blocks
from edgeprune.pruning.graph import build_graph

PLAN_VERSION = 1


@dataclass
class Plan:
    input_shape: tuple[int, ...]
    widths: dict[str, int]  # every group's root layer -> full width (unpruned groups included)
    keep: dict[str, list[int]]  # pruned groups only: root layer -> kept channel indices (sorted)
    criterion: str = "l1"
    step: int = 1
    exclude: list[str] = field(default_factory=list)
    # residual blocks replaced by an identity (their inner group keeps [])
    drop: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {root: len(self.keep.get(root, range(w))) for root, w in self.widths.items()}

    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "input_shape": list(self.input_shape),
            "widths": self.widths,
            "keep": self.keep,
            "criterion": self.criterion,
            "step": self.step,
            "exclude": self.exclude,
            "drop": self.drop,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        try:
            if d.get("version", 0) > PLAN_VERSION:
                raise EdgepruneError(f"plan format {d['version']} is newer than this edgeprune ({PLAN_VERSION})")
            return cls(
                tuple(d["input_shape"]),
                {k: int(v) for k, v in d["widths"].items()},
                {k: [int(i) for i in v] for k, v in d["keep"].items()},
                d.get("criterion", ""),
                int(d.get("step", 1)),
                list(d.get("exclude", [])),
                [str(b) for b in d.get("drop", [])],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EdgepruneError(f"not a valid edgeprune plan ({type(e).__name__}: {e})") from None

    def hash(self) -> str:
        """Content hash (of what is kept, not of how it was chosen): the cache key of evaluations."""
        blob = json.dumps({"s": list(self.input_shape), "k": self.keep}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> str:
        """JSON with one line per field and per group: small, and readable in a diff."""
        d = self.to_dict()
        keep = ",\n".join(
            f"    {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in d.pop("keep").items()
        )
        head = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items())
        return f'{{\n{head},\n  "keep": {{\n{keep}\n  }}\n}}\n'

    def save(self, path: str | os.PathLike) -> Path:
        from edgeprune.runs import write_text

        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise EdgepruneError(f"cannot read plan {path}: {e}") from None

    def apply(self, model: nn.Module, *, inplace: bool = False) -> nn.Module:
        """The pruned model: `model` (the unpruned base) with only the kept channels."""
        if not inplace:
            model = copy.deepcopy(model)
        model.eval()
        if not self.keep:
            return model
        example = torch.randn(*self.input_shape)
        DG = build_graph(model, example)
        names = dict(model.named_modules())
        for root, kept in self.keep.items():
            if not kept:
                if not any(root.startswith(b + ".") for b in self.drop):
                    raise EdgepruneError(f"plan keeps no channel of {root!r} but removes no block around it")
                continue
            module = names.get(root)
            if module is None:
                raise EdgepruneError(f"plan prunes layer {root!r}, which this model does not have: wrong base model?")
            width = DG.get_out_channels(module)
            if width != self.widths[root]:
                raise EdgepruneError(
                    f"plan expects {self.widths[root]} channels at {root!r}, the model has {width}: wrong base model?"
                )
            keep = set(kept)
            idxs = [i for i in range(width) if i not in keep]
            pruner = DG.get_pruner_of_module(module)
            group = DG.get_pruning_group(module, pruner.prune_out_channels, idxs)
            if not DG.check_pruning_group(group):
                raise EdgepruneError(f"cannot prune group at {root!r}: it would remove every channel of a layer")
            try:
                group.prune()
            except Exception as e:
                raise EdgepruneError(
                    f"pruning the group at {root!r} failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                    "the architecture has a channel dependency the graph does not cover: exclude that layer"
                ) from None
            if DG.get_out_channels(module) != len(kept):
                raise EdgepruneError(f"pruning {root!r} left {DG.get_out_channels(module)} channels, not {len(kept)}")
        if self.drop:  # after pruning: a group's root may lie in a removed block while its channels run on
            remove_blocks(model, self.drop)
        try:
            with torch.no_grad():
                model(example)
        except Exception as e:
            raise EdgepruneError(
                f"the pruned model no longer runs ({type(e).__name__}: {str(e).splitlines()[0][:160]}); a channel "
                "dependency was missed: exclude the layers named there"
            ) from None
        return model
