"""Files a run writes into its folder: stage manifests, feature matrices, the preprocessor.

Notebooks hand results to each other and to the flow through these files, never through
cell outputs. Every write goes to a temporary name first, then is renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The flow process uses only the manifest and atomic-write helpers; the numeric stack is
# imported where matrices are read or written (in kernels), not on every pipeline start.
if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from sklearn.feature_extraction import DictVectorizer

    from taxi_duration.modeling.features import FeatureMatrices

PREPROCESSOR_FILENAME = "preprocessor.b"
VALIDATION_RECORDS = "features/validation_records.parquet"
TRAIN_PICKUP_TIMES = "features/train_pickup.npy"


class MissingRunFileError(FileNotFoundError):
    """A stage's input is not in the run folder: the stage before it did not run or failed."""


@contextmanager
def atomic_path(destination: Path) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; rename it into place if the block succeeds."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; run files are meant to be shared
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


# outputs/<color>/<YYYY-MM>/<UTC start>-[score-]<first 8 of the MLflow run id>: sortable and unique.
_RUN_FOLDER_NAME = re.compile(r"^\d{8}T\d{6}Z-(?:score-)?(?P<run>[0-9a-f]{8})$")


def run_folder(
    outputs_dir: Path, color: str, month: str, started: dt.datetime, run_id: str, scoring: bool = False
) -> Path:
    """The folder of a pipeline run (month: its training month) or a scoring run (the scored month)."""
    return Path(outputs_dir) / color / month / f"{started:%Y%m%dT%H%M%SZ}-{'score-' if scoring else ''}{run_id[:8]}"


def run_id_prefix(folder: Path) -> str | None:
    """The MLflow run id's first 8 characters, read from a run folder's name; None for another folder."""
    match = _RUN_FOLDER_NAME.match(Path(folder).name)
    return match["run"] if match else None


def manifest_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / f"{stage}.manifest.json"


def write_manifest(run_dir: Path, stage: str, content: dict[str, Any]) -> Path:
    """Record what a stage produced (paths, counts, metrics) as JSON in the run folder.

    The notebooks write typed records through `taxi_duration.manifests.write`, which calls this.
    """
    path = manifest_path(run_dir, stage)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps({"stage": stage, **content}, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_manifest(run_dir: Path, stage: str) -> dict[str, Any]:
    path = manifest_path(run_dir, stage)
    if not path.is_file():
        raise MissingRunFileError(f"{path} does not exist: stage {stage} has not completed in {run_dir}")
    return json.loads(path.read_text())


def _matrix_paths(run_dir: Path) -> dict[str, Path]:
    folder = Path(run_dir) / "features"
    return {
        "X_train": folder / "X_train.npz",
        "y_train": folder / "y_train.npy",
        "X_val": folder / "X_val.npz",
        "y_val": folder / "y_val.npy",
        "preprocessor": Path(run_dir) / PREPROCESSOR_FILENAME,
    }


def save_matrices(run_dir: Path, matrices: FeatureMatrices) -> dict[str, str]:
    """Write the matrices, targets and fitted DictVectorizer; return their paths relative to `run_dir`."""
    import numpy as np
    import scipy.sparse

    paths = _matrix_paths(run_dir)
    for name in ("X_train", "X_val"):
        with atomic_path(paths[name]) as temporary, open(temporary, "wb") as sink:
            scipy.sparse.save_npz(sink, getattr(matrices, name))
    for name in ("y_train", "y_val"):
        with atomic_path(paths[name]) as temporary, open(temporary, "wb") as sink:
            np.save(sink, getattr(matrices, name))
    save_preprocessor(paths["preprocessor"], matrices.vectorizer)
    return {name: path.relative_to(run_dir).as_posix() for name, path in paths.items()}


def save_validation_records(run_dir: Path, records: pd.DataFrame) -> str:
    """Keep the validation trips' raw features so other models can be re-scored on them."""
    return save_table(run_dir, VALIDATION_RECORDS, records)


def save_table(run_dir: Path, relative_path: str, frame: pd.DataFrame) -> str:
    """Write `frame` as parquet at `relative_path` in the run folder (atomically); return that path."""
    path = Path(run_dir) / relative_path
    with atomic_path(path) as temporary:
        frame.reset_index(drop=True).to_parquet(temporary, index=False)
    return relative_path


def save_pickup_times(run_dir: Path, pickup_times: pd.Series) -> str:
    """Keep the training rows' pickup times, in the matrix's row order: a search carves its hold-out by them."""
    import numpy as np

    with atomic_path(Path(run_dir) / TRAIN_PICKUP_TIMES) as temporary, open(temporary, "wb") as sink:
        np.save(sink, pickup_times.to_numpy(dtype="datetime64[ns]"))
    return TRAIN_PICKUP_TIMES


def load_pickup_times(run_dir: Path) -> np.ndarray:
    import numpy as np

    path = Path(run_dir) / TRAIN_PICKUP_TIMES
    if not path.is_file():
        raise MissingRunFileError(f"{path} does not exist: the stage that saves the features has not run here")
    return np.load(path)


def load_validation_records(run_dir: Path) -> pd.DataFrame:
    import pandas as pd

    path = Path(run_dir) / VALIDATION_RECORDS
    if not path.is_file():
        raise MissingRunFileError(f"{path} does not exist: the stage that saves the features has not run here")
    return pd.read_parquet(path)


def load_matrices(run_dir: Path) -> FeatureMatrices:
    """Read what `save_matrices` wrote; a clear error if the stage that saves them has not run."""
    import numpy as np
    import scipy.sparse

    from taxi_duration.modeling.features import FeatureMatrices

    paths = _matrix_paths(run_dir)
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise MissingRunFileError(
            f"feature files missing (the stage that saves them has not run here): {', '.join(missing)}"
        )
    return FeatureMatrices(
        X_train=scipy.sparse.csr_matrix(scipy.sparse.load_npz(paths["X_train"])),
        y_train=np.load(paths["y_train"]),
        X_val=scipy.sparse.csr_matrix(scipy.sparse.load_npz(paths["X_val"])),
        y_val=np.load(paths["y_val"]),
        vectorizer=load_preprocessor(paths["preprocessor"]),
    )


def save_preprocessor(path: Path, vectorizer: DictVectorizer) -> None:
    """Pickle the fitted DictVectorizer (the course's `preprocessor.b`, read by serving code)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as sink:
        pickle.dump(vectorizer, sink)


def load_preprocessor(path: Path) -> DictVectorizer:
    with open(path, "rb") as source:
        return pickle.load(source)
