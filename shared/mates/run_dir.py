"""A run directory as a process finds it: creating one with only its manifest (`init_run`),
opening its manifest for a config (refusing another config's run), and holding its lock
while a process executes the run."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mates.artifacts import RunPaths
from mates.config import RunConfig
from mates.errors import ArtifactError, ConfigError, RunStateError
from mates.manifest import Manifest, new_run_id


def init_run(cfg: RunConfig, root: Path) -> Manifest:
    """Create `<root>/<run_id>/` holding only the run's manifest (how the services start a run)."""
    run_id = new_run_id(cfg.name)
    paths = RunPaths(Path(root) / run_id)
    paths.root.mkdir(parents=True)
    return Manifest.create(
        paths.manifest,
        cfg.model_dump(mode="json"),
        cfg.fingerprint(),
        cfg.stages.num_stages,
        run_id=run_id,
    )


def open_manifest(cfg: RunConfig, paths: RunPaths) -> Manifest:
    """The run dir's manifest, created for `cfg` when there is none; refused when it holds
    a run of another config."""
    fp = cfg.fingerprint()
    if paths.manifest.is_file():
        m = Manifest.load(paths.manifest)
        if m.data["config_fingerprint"] != fp:
            raise ConfigError(
                f"{paths.root} holds a run with a different config; "
                "resume it with its own config or choose another --out"
            )
        return m
    paths.root.mkdir(parents=True, exist_ok=True)
    return Manifest.create(paths.manifest, cfg.model_dump(mode="json"), fp, cfg.stages.num_stages)


@contextmanager
def hold_run_dir(path: Path, manifest: Manifest) -> Iterator[None]:
    """Hold the run dir's lock (`path`) while executing: a second process refuses instead of
    writing alongside. The OS drops the lock when its holder dies, however it dies, so
    a killed run resumes at once although run.json still says 'running'."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ArtifactError(f"cannot open {path}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise RunStateError(
                f"run {manifest.run_id} is being executed by another "
                f"process (pid {holder}); cancel it or wait"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
