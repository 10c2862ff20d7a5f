"""The command line: ``slipstream demo`` and ``slipstream bench`` (more commands come with
the trainer, live and tune layers).

Exit codes: 0 success, 1 a slipstream error (its message on stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from slipstream._core.errors import SlipstreamError


def _demo(args: argparse.Namespace) -> int:
    from slipstream._demo import run

    run(quick=args.quick, directory=args.dir)
    return 0


def _bench(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    scripts = sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))
    if not scripts:
        raise SlipstreamError(
            f"no benchmarks in {root}/; run from the repository root or pass --dir"
        )
    if args.list:
        print("\n".join(p.stem for p in scripts))
        return 0
    chosen = [p for p in scripts if not args.names or p.stem in args.names]
    unknown = set(args.names) - {p.stem for p in scripts}
    if unknown:
        raise SlipstreamError(
            f"unknown benchmark(s) {sorted(unknown)}; choose from {[p.stem for p in scripts]}"
        )
    failed = 0
    for script in chosen:
        cmd = [sys.executable, str(script.resolve()), *(["--quick"] if args.quick else [])]
        failed += subprocess.run(cmd, cwd=root, check=False).returncode != 0
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slipstream", description="Fast training on large datasets.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="the input pipeline end to end: throughput, input stall, resume",
        description="Writes a sharded JPEG dataset, measures the pipeline, trains a small CNN "
        "fed by it and resumes mid-epoch. Example: slipstream demo --quick",
    )
    demo.add_argument("--quick", action="store_true", help="a few seconds instead of a minute")
    demo.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="keep the dataset here (default: a temporary directory)",
    )
    demo.set_defaults(run=_demo)
    bench = sub.add_parser(
        "bench",
        help="run the benchmarks in ./benchmarks (one JSON line each)",
        description="Example: slipstream bench pipeline_arrays --quick",
    )
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true", help="small sizes: under a minute each")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--dir", default="benchmarks", help="where the benchmark scripts are")
    bench.set_defaults(run=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except SlipstreamError as e:
        print(f"slipstream {args.command}: {e}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
