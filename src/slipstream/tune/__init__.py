"""The acceleration advisor: probes, search and report (DESIGN.md §5)."""

from slipstream.tune._advisor import Probes, TuneResult, tune
from slipstream.tune._search import Knob, Trial, search

__all__ = ["Knob", "Probes", "Trial", "TuneResult", "search", "tune"]
