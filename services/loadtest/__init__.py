"""Load test of the scorer: N concurrent clients POST /v1/score for a bounded time.

    python -m services.loadtest [--url URL --model RUN/K [--pid PID]] [--clients 20] [--seconds 30]

Without `--url` it prepares a model (an untrained head on the influence encoder of
`--config`, shaped like that run's models; or the models of `--run-dir`), starts a real
`mates serve scorer` on a free loopback port and stops it by PID at the end.
After a warm-up it measures requests/s, documents/s, latency percentiles, errors (by
status or exception, including a response without exactly one score per document in
order) and the scorer's resident memory (VmRSS of its PID) over the run. The exit
status is 1 if any request failed or memory grew more than `--max-rss-growth-mib`.

One module each: `load` (the clients and what they saw), `report`, `scorer` (one started
here) and `command` (the options and the test from start to end).
"""

from services.loadtest.command import main, parse_args, read_texts, run_load
from services.loadtest.load import Phase, Workload, check_scores, rss_mib
from services.loadtest.report import format_report
from services.loadtest.scorer import local_scorer, prepare_model

__all__ = [
    "Phase",
    "Workload",
    "check_scores",
    "format_report",
    "local_scorer",
    "main",
    "parse_args",
    "prepare_model",
    "read_texts",
    "rss_mib",
    "run_load",
]
