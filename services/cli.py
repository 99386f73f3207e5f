"""The services' commands of the `mates` command line: `runs` (submit and follow runs on
an API server), `serve` (start a service) and `loadtest` (the scorer under load).

Registered under the `mates.commands` entry-point group (pyproject.toml), so `mates runs`
works wherever the services are installed while the library imports none of them. Only
argparse is imported here; each command imports what it needs when it runs, so a missing
services extra is one clear error. Like the library's CLI, this module may print.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from mates.cli import print_stages
from mates.errors import MatesError
from mates.manifest import RunStatus

DEFAULT_API_URL = "http://127.0.0.1:8000"
# `mates serve X` calls `<module>.serve()`; imported only then, so the library works alone.
SERVICES = {
    "api": "services.api.app",
    "scorer": "services.scorer.app",
    "trainer": "services.trainer.main",
    "worker": "services.worker.main",
}


def _add_runs_args(sub) -> None:
    # --api is accepted before or after the runs subcommand
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument(
        "--api",
        default=argparse.SUPPRESS,
        metavar="URL",
        help=f"API base URL (default: $MATES_API_URL or {DEFAULT_API_URL}); "
        "the key comes from $MATES_API_KEY",
    )
    runs = sub.add_parser(
        "runs", parents=[api], help="submit and follow runs on a MATES API server"
    )
    rsub = runs.add_subparsers(dest="runs_command", required=True)
    for name, handler in RUNS_COMMANDS.items():
        p = rsub.add_parser(name, parents=[api], help=handler.__doc__)
        if name == "submit":
            p.add_argument(
                "config", type=Path, help="YAML run config (data paths as the server sees them)"
            )
            p.add_argument(
                "--set",
                dest="overrides",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="override a config field (repeatable)",
            )
        elif name == "list":
            p.add_argument("--status", default=None, help="only runs in this status")
            p.add_argument("--limit", type=int, default=50)
        else:
            p.add_argument("run_id")
        if name == "show":
            p.add_argument("--json", action="store_true", help="the API's full JSON")
        if name == "watch":
            p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")


def _api_client(args):
    try:
        from services.api.client import ApiClient
    except ModuleNotFoundError as e:
        raise MatesError(
            f"`mates runs` needs the services extra (pip install 'mates[services]'): "
            f"{e.name} is not installed"
        ) from None
    url = getattr(args, "api", None) or os.environ.get("MATES_API_URL") or DEFAULT_API_URL
    return ApiClient(url, os.environ.get("MATES_API_KEY"))


def _when(ts: float | None) -> str:
    import time

    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def runs_submit(client, args) -> int:
    """validate a config and submit it"""
    from mates.config import load_config

    cfg = load_config(args.config, args.overrides)
    run = client.submit(cfg.model_dump(mode="json"))
    print(f"submitted run {run['id']}: {run['status']}, {run['num_stages']} stages")
    print(f"follow it with: mates runs watch {run['id']}")
    return 0


def runs_list(client, args) -> int:
    """runs, newest first"""
    rows = client.list(status=args.status, limit=args.limit)
    if not rows:
        print("no runs")
        return 0
    from services.common.contracts import stages_done

    # "done" counts the stages that ended done (3/3 for a finished 3-stage run); "stage" is
    # the stage the run is at, numbered from 0 like its stage-<k> folders
    print(f"{'run':<28} {'status':<10} {'done':>5} {'stage':>5} {'state':<9} {'updated':<19}")
    for r in rows:
        done = f"{stages_done(r['current_stage'], r.get('stage_state'))}/{r['num_stages']}"
        print(
            f"{r['id']:<28} {r['status']:<10} {done:>5} {r['current_stage']:>5} "
            f"{r.get('stage_state') or '-':<9} {_when(r['updated_at']):<19}"
        )
    return 0


def runs_show(client, args) -> int:
    """a run's stages, timings and metrics"""
    run = client.show(args.run_id)
    if args.json:
        print(json.dumps(run, indent=2))
        return 0
    print(
        f"run {run['id']} ({run['name']}): {run['status']}"
        + (f": {run['error']}" if run.get("error") else "")
    )
    print(
        f"created {_when(run['created_at'])}, updated {_when(run['updated_at'])}, "
        f"generation {run['generation']}, artifacts {run['artifacts_dir']}"
    )
    print_stages(run)
    for st in run["stages"]:
        if st.get("error"):
            print(f"stage {st['stage']} error: {st['error']}")
    return 0


def runs_watch(client, args) -> int:
    """follow a run until it ends (exit 0 done, 1 failed or cancelled)"""
    import time

    printed: dict[int, int] = {}  # stage -> transitions printed
    status = None
    while True:
        run = client.show(args.run_id)
        for st in run["stages"]:
            for t in st["transitions"][printed.get(st["stage"], 0) :]:
                reason = f" ({t['reason']})" if t.get("reason") else ""
                print(f"{_when(t['at'])} stage {st['stage']}: {t['state']}{reason}", flush=True)
            printed[st["stage"]] = len(st["transitions"])
        if run["status"] != status:
            status = run["status"]
            print(
                f"{_when(run['updated_at'])} run {run['id']}: {status}"
                + (f": {run['error']}" if run.get("error") else ""),
                flush=True,
            )
        if status == RunStatus.DONE:
            return 0
        if status in (RunStatus.FAILED, RunStatus.CANCELLED):
            return 1
        time.sleep(args.interval)


def _print_control(run: dict) -> int:
    note = {
        RunStatus.CANCELLING: "the worker stops it at its next step",
        RunStatus.QUEUED: f"generation {run['generation']}, from stage {run['current_stage']}",
    }
    print(
        f"run {run['id']}: {run['status']}"
        + (f" ({note[run['status']]})" if run["status"] in note else "")
    )
    return 0


def runs_cancel(client, args) -> int:
    """ask an active run to stop"""
    return _print_control(client.cancel(args.run_id))


def runs_resume(client, args) -> int:
    """continue a failed or cancelled run"""
    return _print_control(client.resume(args.run_id))


# Subcommands are named after their handlers (`runs_<name>`).
RUNS_COMMANDS = {
    f.__name__.removeprefix("runs_"): f
    for f in (runs_submit, runs_list, runs_show, runs_watch, runs_cancel, runs_resume)
}


def cmd_runs(args) -> int:
    with _api_client(args) as client:
        return RUNS_COMMANDS[args.runs_command](client, args)


# `mates serve` options and the settings they set; the environment variable stays the
# default when an option is not given
SERVE_OPTIONS = {
    "api": {"host": "MATES_API_HOST", "port": "MATES_API_PORT"},
    "scorer": {"host": "MATES_SCORER_HOST", "port": "MATES_SCORER_PORT"},
    "worker": {"concurrency": "MATES_WORKER_CONCURRENCY"},
    "trainer": {},
}


def _serve_settings(args) -> None:
    """Put `--host`, `--port` and `--concurrency` where every settings reader finds them
    (this process, and the processes a worker forks)."""
    allowed = SERVE_OPTIONS[args.service]
    for option in ("host", "port", "concurrency"):
        value = getattr(args, option)
        if value is None:
            continue
        if option not in allowed:
            takers = [s for s, opts in SERVE_OPTIONS.items() if option in opts]
            raise MatesError(
                f"`mates serve {args.service}` takes no --{option} "
                f"(it is for {' and '.join(takers)})"
            )
        os.environ[allowed[option]] = str(value)
    from services.common.settings import get_settings

    get_settings.cache_clear()  # read again, with the options


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1 to 65535, got {port}")
    return port


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def cmd_serve(args) -> int:
    import importlib

    _serve_settings(args)
    name = SERVICES[args.service]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("services", "mates"):
            raise
        raise MatesError(
            f"`mates serve {args.service}` needs the services extra "
            f"(pip install 'mates[services]'): {e.name} is not installed"
        ) from None
    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)  # a server reports what it does
    module.serve()
    return 0


def _loadtest(argv: list[str]) -> int:
    from services.loadtest import main as loadtest_main

    return loadtest_main(argv)


RAW = {"loadtest": _loadtest}
"""Commands that parse their own options (`mates loadtest --help`)."""


def register(sub) -> dict:
    """Add this module's commands to `mates`' subparsers; their handlers by name."""
    _add_runs_args(sub)
    serve = sub.add_parser("serve", help="run one of the services (needs the services extra)")
    serve.add_argument("service", choices=tuple(SERVICES), help="which service")
    serve.add_argument("--host", help="bind address (api, scorer; default $MATES_API_HOST ...)")
    serve.add_argument("--port", type=_port, help="port (api, scorer; default $MATES_API_PORT ...)")
    serve.add_argument(
        "--concurrency",
        type=_positive,
        help="tasks at once (worker; default $MATES_WORKER_CONCURRENCY or 2)",
    )
    sub.add_parser(
        "loadtest", help="load-test the scorer on loopback (its options: mates loadtest --help)"
    )
    return {"runs": cmd_runs, "serve": cmd_serve}
