"""Content-keyed cache of notebook stages: skip a stage whose inputs have not changed.

A stage's key is derived the same way for every stage (`stage_key`): the notebook file's bytes,
the parameters it receives (less those that only say where things are: LOCATION_VALUES), the
sha256 of each trip file it reads, the keys of its upstream stages, and the package's own source. An
unchanged key means the earlier outputs are reused: they are linked into the new run folder,
so every run folder stays complete. Only stages that succeeded are ever stored, which is
also what makes a rerun after a failure resume at the failed stage.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taxi_duration.runfiles import atomic_path

if TYPE_CHECKING:
    from taxi_duration.orchestration.declarations import Stage

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CHUNK = 1 << 20
# Run values that say where things are, not what they are: no part of a key. A run folder or
# MLflow run id is new each run, and a trip file counts by its sha256, not its path (*_file).
# Where a search's trials run (how many at once, on Dask or not) says how, not what, it searches.
LOCATION_VALUES = frozenset(
    {"data_source", "data_dir", "run_dir", "mlflow_run_id", "tune_workers", "dask", "dask_address"}
)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def package_source_digest() -> str:
    """One digest of the package's code and report templates (a change reruns every stage)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".j2", ".json"):
            digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def keyed_parameters(received: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a stage receives that count in its key: all but the location values."""
    return {
        name: value for name, value in received.items() if name not in LOCATION_VALUES and not name.endswith("_file")
    }


def stage_key(
    stage: Stage,
    received: Mapping[str, Any],
    trip_digests: Mapping[str, str],
    upstream_keys: Mapping[str, str],
) -> str:
    """sha256 over what determines a stage's outputs.

    `received`: the parameters the stage gets; `trip_digests`: sha256 by month role (the
    stage's `reads` count); `upstream_keys`: keys by stage name (its `needs` count).
    """
    payload = {
        "stage": stage.name,
        "notebook": file_sha256(stage.notebook),
        "parameters": keyed_parameters(received),
        "inputs": {role: trip_digests[role] for role in stage.reads},
        "upstream": {name: upstream_keys[name] for name in stage.needs},
        "package": package_source_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    stage: str
    key: str
    run_dir: str  # where the stage ran
    mlflow_run_id: str
    files: tuple[str, ...]  # relative to run_dir
    created: str


class StageCache:
    """Entries as small JSON files under `root/<stage>/<key>.json`, pointing at a run folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.json"

    def lookup(self, stage: str, key: str) -> CacheEntry | None:
        """The entry for `key`, if every file it names still exists."""
        path = self._path(stage, key)
        try:
            raw = json.loads(path.read_text())
            entry = CacheEntry(**{**raw, "files": tuple(raw["files"])})
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if not all((Path(entry.run_dir) / name).is_file() for name in entry.files):
            return None  # the earlier run folder was cleaned up: run the stage again
        return entry

    def store(self, stage: str, key: str, run_dir: Path, mlflow_run_id: str, files: list[str]) -> CacheEntry:
        entry = CacheEntry(
            stage=stage,
            key=key,
            run_dir=str(run_dir),
            mlflow_run_id=mlflow_run_id,
            files=tuple(sorted(set(files))),
            created=dt.datetime.now(dt.UTC).isoformat(),
        )
        with atomic_path(self._path(stage, key)) as temporary:
            temporary.write_text(json.dumps(asdict(entry), indent=2) + "\n")
        return entry

    @staticmethod
    def restore(entry: CacheEntry, run_dir: Path) -> list[Path]:
        """Put the entry's files into `run_dir`: hard links (files are never modified in place), else copies."""
        restored = []
        for name in entry.files:
            source = Path(entry.run_dir) / name
            target = Path(run_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
            restored.append(target)
        return restored
