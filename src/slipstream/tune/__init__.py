"""The acceleration advisor: probes, search and report (issue: the advisor)."""
