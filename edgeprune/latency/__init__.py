"""Latency measurement protocol (and, later, tables and the predictor)."""

from edgeprune.latency.measurement import Measurement, Protocol, measure_callable

__all__ = ["Measurement", "Protocol", "measure_callable"]
