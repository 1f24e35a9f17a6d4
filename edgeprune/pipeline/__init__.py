"""End-to-end pipelines."""

from edgeprune.pipeline.quickstart import QuickstartConfig, run_quickstart

__all__ = ["QuickstartConfig", "run_quickstart"]
