"""Built-in workloads: models and data used by the CLI, the demo and the benchmarks."""
