"""The command line: ``slipstream train | tune | demo | bench | serve | dashboard``.

Exit codes: 0 success; 1 a slipstream error while working (its message on stderr); 2 a usage
or config error, found before any work started; 3 ``train --require-goal`` finished without
reaching the workload's stated quality; 130 interrupted.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from slipstream._core.config import ConfigError
from slipstream._core.errors import SlipstreamError

GOAL_MISSED = 3


def _train(args: argparse.Namespace) -> int:
    from slipstream.workloads._build import load_config, train

    overrides = [*args.set, *([f"run={args.run}"] if args.run else [])]
    outcome = train(load_config(args.config, overrides), resume=args.resume)
    final = ", ".join(f"{k} {v:.4g}" for k, v in outcome.final.items() if isinstance(v, float))
    print(f"done in {outcome.seconds:.1f} s ({outcome.history.steps} steps): {final}")
    if outcome.goal is not None:
        verdict = {True: "reached", False: "NOT reached", None: "not measured"}[outcome.goal_met]
        print(f"goal {outcome.goal}: {verdict}")
    print(f"run directory: {outcome.config.run} (config.toml, events.jsonl, weights/)")
    return GOAL_MISSED if args.require_goal and outcome.goal_met is not True else 0


def _add_train(sub: Any) -> None:
    from slipstream.workloads import WORKLOADS

    train = sub.add_parser(
        "train",
        help="train from a TOML config or a built-in workload",
        description="Train from CONFIG: a TOML file with [data], [model], [train] and [live] "
        f"sections, or a built-in workload's config ({', '.join(WORKLOADS)}). The resolved "
        "config is saved in the run directory. Examples: slipstream train digits-cnn; "
        "slipstream train my.toml --set train.epochs=3 --set train.strategy=hogwild "
        "--set train.workers=2",
    )
    train.add_argument("config", help="a TOML config file, or a built-in workload name")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax; repeatable), e.g. --set data.batch=128",
    )
    train.add_argument("--run", default=None, help="the run directory (default: the config's)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run directory's latest checkpoint (train.checkpoint_every "
        "writes them), when there is one",
    )
    train.add_argument(
        "--require-goal",
        action="store_true",
        help=f"exit {GOAL_MISSED} unless the workload's stated quality is reached (and measured)",
    )
    train.set_defaults(run_command=_train)


def _tune(args: argparse.Namespace) -> int:
    from slipstream.workloads._build import load_config, tune_config

    config = load_config(args.config, args.set)
    if args.out is not None:
        out = Path(args.out)
    elif Path(args.config).exists():
        out = Path(args.config).with_suffix(".tuned.toml")
    else:  # a built-in workload's name
        out = Path(f"{args.config}.tuned.toml")
    tuned = tune_config(config, out, args.budget, cache=not args.no_cache)
    print(tuned.result.table())
    print(f"wrote {tuned.path}" + (f" and {tuned.plot}" if tuned.plot else ""))
    print(f"see it in the dashboard: slipstream dashboard {tuned.records.parent}")
    print(f"train with it: slipstream train {tuned.path}")
    return 0


def _add_tune(sub: Any) -> None:
    tune = sub.add_parser(
        "tune",
        help="measure your model and data, name the bottleneck, pick the fastest configuration",
        description="Probes the pipeline alone, the step alone and both together, names the "
        "bottleneck, then searches the knobs that matter for it within the budget and writes "
        "a config that `slipstream train` takes as it is. Example: slipstream tune "
        "workloads/digits.toml --budget 120s",
    )
    tune.add_argument("config", help="a TOML config file, or a built-in workload name")
    tune.add_argument("--budget", default="2m", help="time to spend: 120, 120s, 2m (default 2m)")
    tune.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value before tuning (repeatable)",
    )  # fmt: skip
    tune.add_argument(
        "--out", default=None, help="where to write the tuned config (default: CONFIG.tuned.toml)"
    )
    tune.add_argument(
        "--no-cache", action="store_true", help="measure again even if this was tuned before"
    )
    tune.set_defaults(run_command=_tune)


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


def _serve(args: argparse.Namespace) -> int:
    from slipstream.live import serve

    # Block the stop signals before the server's threads start (they inherit the mask), so
    # that only sigwait below sees them.
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    server = serve(
        args.run,
        model=args.model,
        host=args.host,
        port=args.port,
        token=args.token,
        pin=args.pin,
        max_body_bytes=args.max_body_bytes,
    )
    print(f"serving {args.run} at {server.url} (POST /predict, GET /version)", flush=True)
    try:
        signal.sigwait(stops)  # until Ctrl-C or a SIGTERM
    finally:
        server.close()
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from slipstream.live._dashboard import serve_dashboard

    serve_dashboard(args.runs, host=args.host, port=args.port, token=args.token)  # until a signal
    return 0


def _add_http_args(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other needs --token)",
    )
    p.add_argument("--port", type=int, default=port, help=f"port (default {port}; 0: any free)")
    p.add_argument(
        "--token",
        default=None,
        help="a secret every request must carry (Authorization: Bearer TOKEN)",
    )


def _add_live_commands(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="answer predictions with a run's newest weights, swapped in while it trains",
        description="Example: slipstream serve runs/digits --port 8000, then "
        "curl -d '{\"inputs\": [...]}' localhost:8000/predict",
    )
    serve.add_argument("run", help="the run directory (the dir given to ss.Live)")
    serve.add_argument(
        "--model",
        default=None,
        help="package.module:factory that builds the model (default: the run's)",
    )
    serve.add_argument("--pin", type=int, default=None, help="serve this version, not the newest")
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=16 << 20,
        help="larger request bodies get 413 (default 16 MiB)",
    )
    _add_http_args(serve, 8000)
    serve.set_defaults(run_command=_serve)
    dash = sub.add_parser(
        "dashboard",
        help="live plots of runs: follows a running one, replays a finished one",
        description="Example: slipstream dashboard runs/a runs/b (compares two runs)",
    )
    dash.add_argument("runs", nargs="+", help="run directories")
    _add_http_args(dash, 8080)
    dash.set_defaults(run_command=_dashboard)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slipstream", description="Fast training on large datasets.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_tune(sub)
    demo = sub.add_parser(
        "demo",
        help="the whole product in a few minutes: data, tune, train live, serve, report",
        description="Writes a sharded JPEG dataset, tunes the images-cnn workload, trains the "
        "chosen configuration with the dashboard live and weights published, serves "
        "predictions from the live model, and reports accuracy, samples/s, input stall and "
        "the speed-up. Example: slipstream demo --quick",
    )
    demo.add_argument("--quick", action="store_true", help="small sizes: under two minutes")
    demo.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the dataset and the run go (default: ./slipstream-demo)",
    )
    demo.set_defaults(run_command=_demo)
    bench = sub.add_parser(
        "bench",
        help="run the benchmarks in ./benchmarks (one JSON line each)",
        description="Example: slipstream bench pipeline_arrays --quick",
    )
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    bench.add_argument("--quick", action="store_true", help="small sizes: under a minute each")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--dir", default="benchmarks", help="where the benchmark scripts are")
    bench.set_defaults(run_command=_bench)
    _add_live_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.run_command(args)
    except ConfigError as e:
        print(f"slipstream {args.command}: {e}", file=sys.stderr)
        return 2
    except SlipstreamError as e:
        print(f"slipstream {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"slipstream {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
