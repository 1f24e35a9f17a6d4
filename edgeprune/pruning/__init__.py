"""Structured channel pruning: prunable space, plans, channel criteria, cost counting; with
depth=True also whole residual blocks.

s = edgeprune.pruning.space(model, example_input, step=8)
plan = s.plan(counts, criterion="reprune")      # or s.uniform(0.5)
pruned = plan.apply(model)
"""

from edgeprune.pruning.blocks import ResidualBlock, residual_blocks
from edgeprune.pruning.cost import CostModel, count_macs
from edgeprune.pruning.criteria import CRITERIA, acp_widths, make_criterion
from edgeprune.pruning.plan import Plan
from edgeprune.pruning.sampling import random_counts
from edgeprune.pruning.space import ChannelGroup, PrunableSpace, allowed_counts, output_layers, space
from edgeprune.pruning.uniform import prune_uniform

__all__ = [
    "CRITERIA",
    "ChannelGroup",
    "CostModel",
    "Plan",
    "PrunableSpace",
    "ResidualBlock",
    "acp_widths",
    "allowed_counts",
    "count_macs",
    "make_criterion",
    "output_layers",
    "prune_uniform",
    "random_counts",
    "residual_blocks",
    "space",
]
