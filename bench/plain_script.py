"""The pipeline's recipe as one plain script: the baseline `bench/run.py` measures against.

    .venv/bin/python bench/plain_script.py --data-dir ../shared/data/tlc --tracking-uri sqlite:////tmp/plain/mlflow.db

No Prefect, no papermill, no notebooks, and none of the package's feature code: this is what
a person writes from the course recipe (read parquet, duration with `.dt.total_seconds()`,
keep 1-60 minutes, PU_DO = PU + "_" + DO, `to_dict(orient="records")` + DictVectorizer).
Only the training comes from the package (`taxi_duration.modeling.model`: XGB_PARAMS, the rounds and
early stopping, through `train_booster` itself), so the booster does exactly the work the
pipeline's does, and the MLflow logging mirrors the training
notebook's (params, metrics, the pickled preprocessor, the model with a signature and
explicit pip requirements), so the logging cost is the same too.

Prints the validation RMSE (full precision) and the wall time of each step.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import sys
import tempfile
import time
from pathlib import Path

COLUMN_PREFIX = {"green": "lpep", "yellow": "tpep"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder of {color}_tripdata_YYYY-MM.parquet")
    parser.add_argument("--year", type=int, default=2023, help="training year (default 2023)")
    parser.add_argument("--month", type=int, default=3, help="training month (default 3); validation is the next")
    parser.add_argument("--color", choices=sorted(COLUMN_PREFIX), default="green")
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking URI, e.g. sqlite:////tmp/x/mlflow.db")
    parser.add_argument("--experiment", default="plain-script", help="MLflow experiment (default plain-script)")
    parser.add_argument(
        "--pause-gc",
        action="store_true",
        help="pause the garbage collector during the imports and skip its final scan at exit, "
        "as the pipeline's processes do (taxi_duration.runner.fast_start)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.month <= 12:
        parser.error(f"--month must be 1-12, got {args.month}")
    return args


def trip_file(data_dir: Path, color: str, year: int, month: int) -> Path:
    path = data_dir / f"{color}_tripdata_{year:04d}-{month:02d}.parquet"
    if not path.is_file():
        raise SystemExit(f"error: no trip file {path}")
    return path


def read_dataframe(path: Path, color: str):
    """The course recipe: duration in minutes, 1-60 minute trips, zone ids as strings, PU_DO."""
    import pandas as pd

    prefix = COLUMN_PREFIX[color]
    frame = pd.read_parquet(path)
    frame["duration"] = (
        frame[f"{prefix}_dropoff_datetime"] - frame[f"{prefix}_pickup_datetime"]
    ).dt.total_seconds() / 60
    frame = frame[(frame.duration >= 1) & (frame.duration <= 60)].copy()
    categorical = ["PULocationID", "DOLocationID"]
    frame[categorical] = frame[categorical].astype(str)
    frame["PU_DO"] = frame["PULocationID"] + "_" + frame["DOLocationID"]
    return frame


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal started
        now = time.perf_counter()
        timings[step] = now - started
        started = now

    from taxi_duration.runner.fast_start import imports_without_gc

    with imports_without_gc() if args.pause_gc else contextlib.nullcontext():
        import mlflow
        import mlflow.xgboost
        import xgboost as xgb
        from mlflow.models import infer_signature
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.metrics import root_mean_squared_error

        # The pipeline's exact training, so both train the same booster (not its feature code).
        from taxi_duration.modeling.model import train_booster, training_params
        from taxi_duration.tracking.mlflow_runs import model_pip_requirements

    lap("imports")

    val_year, val_month = (args.year + 1, 1) if args.month == 12 else (args.year, args.month + 1)
    train = read_dataframe(trip_file(args.data_dir, args.color, args.year, args.month), args.color)
    validation = read_dataframe(trip_file(args.data_dir, args.color, val_year, val_month), args.color)
    lap("read + prepare")

    features = ["PU_DO", "trip_distance"]
    vectorizer = DictVectorizer()
    X_train = vectorizer.fit_transform(train[features].to_dict(orient="records"))
    X_val = vectorizer.transform(validation[features].to_dict(orient="records"))
    y_train = train["duration"].to_numpy(dtype="float64")
    y_val = validation["duration"].to_numpy(dtype="float64")
    lap("features")

    # The pipeline's own training call (xgb.train with XGB_PARAMS, NUM_BOOST_ROUND rounds, early
    # stopping on the validation month): the training work must be identical, also while
    # train_booster's settings are being tuned, so the script calls it rather than a copy.
    booster = train_booster(X_train, y_train, X_val, y_val)
    lap("train")

    predictions = booster.predict(xgb.DMatrix(X_val))
    rmse = float(root_mean_squared_error(y_val, predictions))
    baseline_rmse = float(root_mean_squared_error(y_val, [y_train.mean()] * len(y_val)))
    lap("evaluate")

    mlflow.set_tracking_uri(args.tracking_uri)
    if args.tracking_uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(args.experiment) is None:
        # A SQLite store would otherwise put artifacts in ./mlruns of the working directory.
        database = Path(args.tracking_uri.removeprefix("sqlite:///"))
        mlflow.create_experiment(args.experiment, artifact_location=(database.parent / "mlartifacts").as_uri())
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name=f"plain-{args.color}-{args.year:04d}-{args.month:02d}"):
        mlflow.log_params(
            {"year": args.year, "month": args.month, "color": args.color, "data_source": str(args.data_dir)}
        )
        mlflow.log_params(training_params())
        mlflow.log_metrics(
            {
                "rmse": rmse,
                "baseline_rmse": baseline_rmse,
                "best_iteration": booster.best_iteration,
                "train_rows": X_train.shape[0],
                "val_rows": X_val.shape[0],
                "n_features": X_train.shape[1],
                "train_nnz": X_train.nnz,
                "val_nnz": X_val.nnz,
            }
        )
        with tempfile.TemporaryDirectory() as folder:
            preprocessor = Path(folder) / "preprocessor.b"
            with open(preprocessor, "wb") as sink:
                pickle.dump(vectorizer, sink)
            mlflow.log_artifact(str(preprocessor), artifact_path="preprocessor")
        # As taxi_duration.tracking.mlflow_runs.log_xgboost_model: a signature from five rows and the same
        # exact pip requirements (MLflow inferring them would cost seconds).
        requirements = model_pip_requirements()
        info = mlflow.xgboost.log_model(
            booster,
            name="model",
            signature=infer_signature(X_val[:5], predictions[:5]),
            pip_requirements=requirements,
        )
    lap("mlflow logging")

    print(
        f"train {X_train.shape[0]:,} x {X_train.shape[1]:,} ({X_train.nnz:,} non-zeros); "
        f"validation {X_val.shape[0]:,} ({X_val.nnz:,} non-zeros)"
    )
    print(f"validation RMSE {rmse!r} minutes (best iteration {booster.best_iteration})")
    print(f"model {info.model_uri}")
    for step, seconds in timings.items():
        print(f"  {step:<16} {seconds:7.2f} s")
    print(f"  {'total':<16} {sum(timings.values()):7.2f} s")
    if args.pause_gc:
        from taxi_duration.runner.fast_start import exit_without_final_collection

        exit_without_final_collection()
    return 0


if __name__ == "__main__":
    sys.exit(main())
