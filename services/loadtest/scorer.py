"""A scorer of the load test's own: a model shaped like a run's, and `mates serve scorer` on a
free loopback port, stopped by PID at the end."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

log = logging.getLogger("mates.loadtest")


def prepare_model(config: Path, root: Path) -> str:
    """A one-stage run under `root` whose model has `config`'s influence encoder and an
    untrained head: the scorer's cost per document is the fitted model's. Its `run/0`."""
    import torch
    from transformers.utils import logging as hf_logging

    from mates.artifacts import RunPaths
    from mates.config import load_config
    from mates.influence import InfluenceModel, InfluenceScorer, load_encoder
    from mates.manifest import Manifest, new_run_id

    hf_logging.disable_progress_bar()  # "Writing model shards" is noise here
    inf = load_config(config).influence
    run_id = new_run_id("loadtest")
    paths = RunPaths(root / run_id)
    Manifest.create(
        paths.manifest,
        {"name": "loadtest", "stages": {"num_stages": 1}},
        "loadtest",
        1,
        run_id=run_id,
    )
    encoder, tokenizer = load_encoder(inf.encoder, seed=0)
    scorer = InfluenceScorer(
        InfluenceModel(encoder),
        tokenizer,
        inf.max_tokens,
        torch.device("cpu"),
        precision=inf.precision,
    )
    scorer.save(paths.influence_model(0), inf.encoder, inf.train_encoder)
    return f"{run_id}/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, logfile: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"the scorer exited with {proc.returncode}:\n{logfile.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the scorer at {url} was not ready after {timeout_s:.0f} s; log: {logfile}")


@contextmanager
def local_scorer(artifacts: Path, api_key: str, workdir: Path) -> Iterator[tuple[str, int]]:
    """`mates serve scorer` on a free loopback port: (url, pid); stopped by PID on exit."""
    port = _free_port()
    env = {
        **os.environ,
        "MATES_ARTIFACTS_DIR": str(artifacts),
        "MATES_API_KEY": api_key,
        "MATES_DEV": "0",
        "MATES_SCORER_HOST": "127.0.0.1",
        "MATES_SCORER_PORT": str(port),
    }
    env.setdefault("HF_HUB_OFFLINE", "1")
    logfile = workdir / "scorer.log"
    with logfile.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mates.cli", "serve", "scorer"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, proc, logfile)
            log.info("scorer pid %d on %s (log %s)", proc.pid, url, logfile)
            yield url, proc.pid
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
