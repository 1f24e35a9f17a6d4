"""Pictures and reports of a run."""

from edgeprune.report.plots import convergence_plot, prediction_plot, scatter_plot
from edgeprune.report.report import plan_summary, validation_rows, write_report

__all__ = ["convergence_plot", "plan_summary", "prediction_plot", "scatter_plot", "validation_rows", "write_report"]
