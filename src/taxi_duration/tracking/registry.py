"""Model registry with a promotion gate: a run's model becomes "champion" only if it is better.

Every gated run registers its model as a new version of one registered model, one gate at a
time (taxi_duration.tracking.gate_lock). The alias `champion` moves to that version only when the
challenger's validation RMSE is strictly lower than the current champion's RMSE *re-scored on
the same validation trips*: the champion's
logged RMSE was measured on whatever month it was validated on, so comparing it with a
different month's RMSE would reward an easy month rather than a better model. Nor is the
champion re-scored on the month it was trained on: that in-sample score would flatter it (a
backfill of the month before the champion's meets this). The champion then stays, and the
decision says that no fair comparison was possible.

Each version is the servable Pipeline (taxi_duration.serving) with its own feature space: the
DictVectorizer fitted on its own training month is inside it. The champion is re-scored by
loading that version and predicting on the raw validation trips, so it never meets the
challenger's vectorizer (whose column order and width differ).

Every MLflow call goes through an `MlflowClient` built for the given tracking URI. MLflow's
shortcuts for this (`mlflow.register_model`, `load_model("models:/name@champion")`) resolve
against the process-wide tracking/registry URI instead, so they silently act on another store
when the caller's URI is not also the global one.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from taxi_duration import serving, settings
from taxi_duration.modeling.model import rmse
from taxi_duration.tracking import gate_lock, mlflow_runs

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities import LoggedModel
    from mlflow.tracking import MlflowClient

DEFAULT_REGISTERED_MODEL = settings.DEFAULT_REGISTERED_MODEL
CHAMPION_ALIAS = "champion"

TAG_PREFIX = "taxi.promotion."
VERSION_TAG_RUN_ID = "taxi.run_id"
VERSION_TAG_VALIDATION_MONTH = "taxi.validation_month"
VERSION_TAG_TRAIN_MONTH = "taxi.train_month"  # also the tag the flow and the notebook put on their runs
VERSION_TAG_VALIDATION_RMSE = "taxi.validation_rmse"
VERSION_TAG_MODEL_URI = "taxi.model_uri"
# Tag value for "there was no champion", so the keys are always present and searchable.
NO_CHAMPION = "none"
# How the challenger was judged (the `comparison` tag): against the champion re-scored on the
# validation month; not at all, since the champion was trained on that month; or with no champion
# to compare (the first model, no alias, a champion that cannot score raw trips).
COMPARED = "rescored"
NO_FAIR_COMPARISON = "unfair"
NOT_COMPARED = "none"


class RegistryError(RuntimeError):
    """The registry is not in a state the promotion gate can work with."""


class NotServableModelError(RegistryError):
    """A registered version is not the servable Pipeline (a bare booster registered before it)."""


@dataclass(frozen=True)
class PromotionDecision:
    """What the gate did with one run's model, and why."""

    registered_model: str
    version: str  # the version this run registered
    promoted: bool  # the champion alias now points at `version`
    challenger_rmse: float
    champion_rmse: float | None  # previous champion re-scored on this run's validation data
    champion_version: str | None  # previous champion's version; None if there was none
    reason: str  # one human sentence
    comparison: str  # COMPARED, NO_FAIR_COMPARISON or NOT_COMPARED

    def tags(self) -> dict[str, str]:
        """Run tags recording the decision; RMSEs at full precision so they can be compared."""
        champion_rmse = NO_CHAMPION if self.champion_rmse is None else repr(float(self.champion_rmse))
        return {
            f"{TAG_PREFIX}decision": "promoted" if self.promoted else "kept",
            f"{TAG_PREFIX}reason": self.reason,
            f"{TAG_PREFIX}comparison": self.comparison,
            f"{TAG_PREFIX}challenger_rmse": repr(float(self.challenger_rmse)),
            f"{TAG_PREFIX}champion_rmse": champion_rmse,
            f"{TAG_PREFIX}champion_version": NO_CHAMPION if self.champion_version is None else self.champion_version,
            f"{TAG_PREFIX}registered_version": self.version,
        }

    def report_line(self) -> str:
        """The line the training report prints about the registry."""
        outcome = f"promoted to {CHAMPION_ALIAS}" if self.promoted else f"registered, not {CHAMPION_ALIAS}"
        return f"Model registry: {self.registered_model} v{self.version} {outcome}; {self.reason}"


def register_and_gate(
    tracking_uri: str,
    run_id: str,
    model_uri: str,
    validation_records: Sequence[dict[str, Any]] | pd.DataFrame,
    y_val: np.ndarray,
    challenger_rmse: float,
    validation_month: str,
    registered_model: str = DEFAULT_REGISTERED_MODEL,
    train_month: str | None = None,
) -> PromotionDecision:
    """Register the run's model and move the champion alias to it if it beats the champion.

    `model_uri` is the servable model logged by run `run_id` ("models:/m-...", as returned by
    `tracking.log_servable_model`); `validation_records` are the run's validation trips (dicts
    or a frame with PULocationID, DOLocationID and trip_distance) and `y_val` their durations,
    the data `challenger_rmse` was measured on. The current champion is loaded and re-scored on
    those trips; the alias moves only if `challenger_rmse` is strictly lower. A champion from
    before the servable model (NotServableModelError) cannot be re-scored: the challenger
    replaces it, and the reason says so.

    A champion trained on `validation_month` is not re-scored: it stays, and the decision says no
    fair comparison was possible. Its training month is read from its version's tag (recorded
    from `train_month` when it was registered), else from its run's `taxi.train_month` tag; when
    neither names one, it is compared as usual.

    The champion is read, scored and replaced under the gate's lock (taxi_duration.tracking.gate_lock),
    so concurrent gates of the same registered model take turns and each decides on the champion
    of that moment. The champion is scored before anything is written, so a champion that cannot
    be scored otherwise (RegistryError, an MLflow error) leaves the registry and the run untouched.
    The decision is tagged on the run (`PromotionDecision.tags`), which stays RUNNING: the
    caller owns its status.
    """
    records = _frame(validation_records)
    targets = np.asarray(y_val, dtype="float64")
    if targets.shape != (len(records),):
        raise ValueError(f"y_val has shape {targets.shape}; expected one target per validation record ({len(records)})")
    if records.empty:
        raise ValueError("no validation records: cannot compare the challenger with the champion")
    challenger_rmse = float(challenger_rmse)
    if not math.isfinite(challenger_rmse):
        raise ValueError(f"challenger RMSE must be a finite number, got {challenger_rmse}")

    model_id = logged_model_id(model_uri)
    client = mlflow_runs.mlflow_client(tracking_uri)
    logged_model = client.get_logged_model(model_id)
    if logged_model.source_run_id != run_id:
        raise ValueError(
            f"{model_uri} was logged by run {logged_model.source_run_id}, not run {run_id}: "
            "a run can only register its own model"
        )

    # The read, the decision and the alias move happen under the gate's lock (gate_lock), so
    # no other gate moves the champion in between. The alias is read once, inside it, and that
    # version is the one scored and named throughout.
    with gate_lock.champion_gate(tracking_uri, registered_model):
        champion_version = _champion_version(client, registered_model)
        champion_rmse = None
        not_servable = None
        champion_train_month = None
        if champion_version is not None:
            champion_train_month = _train_month_of(client, registered_model, champion_version)
            try:
                if champion_train_month == validation_month:
                    # Its in-sample score is not compared; loading it still finds a champion that cannot serve.
                    load_servable(tracking_uri, registered_model, champion_version)
                else:
                    champion_rmse = rescore_version(tracking_uri, registered_model, champion_version, records, targets)
            except NotServableModelError as error:
                # A champion from before the servable model cannot be re-scored on raw trips: the
                # first servable version takes over, and its tags say why.
                not_servable = str(error)

        version = _create_version(
            client, registered_model, logged_model, run_id, validation_month, challenger_rmse, train_month
        )
        decision = _decide(
            registered_model,
            version,
            challenger_rmse,
            champion_rmse,
            champion_version,
            validation_month,
            not_servable,
            champion_train_month,
        )
        if decision.promoted:
            client.set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)
    tags = decision.tags()
    # On the version too, so someone browsing the registry sees why it is (not) champion.
    for key in (f"{TAG_PREFIX}decision", f"{TAG_PREFIX}reason", f"{TAG_PREFIX}comparison"):
        client.set_model_version_tag(registered_model, version, key, tags[key])
    mlflow_runs.set_tags(tracking_uri, run_id, tags)
    return decision


def rescore_version(
    tracking_uri: str,
    registered_model: str,
    version: str,
    validation_records: Sequence[dict[str, Any]] | pd.DataFrame,
    y_val: np.ndarray,
) -> float:
    """RMSE of registered `version` on the given raw trips: its own Pipeline featurizes them.

    NotServableModelError when the version is a bare booster from before the servable model.
    """
    servable, _ = load_servable(tracking_uri, registered_model, version)
    return servable_rmse(servable, validation_records, y_val)


def servable_rmse(servable: Any, trips: Sequence[dict[str, Any]] | pd.DataFrame, actual_minutes: np.ndarray) -> float:
    """RMSE (minutes) of a servable Pipeline on raw trips whose actual durations are known.

    Every trip counts, those the served model would refuse too: the RMSE it is compared with
    (the booster's, in the training notebook) was measured on all of them.
    """
    # PU_DO pairs the model never saw get no pair feature, as they would in serving.
    predictions = serving.predict_every_trip(servable, _frame(trips))
    return rmse(np.asarray(actual_minutes, dtype="float64"), np.asarray(predictions, dtype="float64"))


def load_servable(tracking_uri: str, registered_model: str, version: str) -> tuple[Any, dict[str, Any]]:
    """The version's servable Pipeline and its MLmodel metadata, fetched through `tracking_uri`.

    NotServableModelError when the version holds some other model (a bare booster).
    """
    download_uri = mlflow_runs.mlflow_client(tracking_uri).get_model_version_download_uri(registered_model, version)
    return load_servable_uri(tracking_uri, download_uri, f"{registered_model} version {version}")


def load_servable_uri(tracking_uri: str, model_uri: str, what: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The servable Pipeline at `model_uri` (a logged model's models:/m-... or an artifact URI) and its metadata."""
    mlflow_runs.import_mlflow()  # first import through the helper that silences its import warning
    import mlflow
    import mlflow.artifacts
    import mlflow.sklearn
    from mlflow.models import Model

    mlflow.set_tracking_uri(tracking_uri)  # a logged model's models:/m-... resolves through the fluent store
    with tempfile.TemporaryDirectory(prefix="taxi-model-") as scratch:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch, tracking_uri=tracking_uri)
        description = Model.load(local)
        if "sklearn" not in description.flavors:
            raise NotServableModelError(
                f"{what or model_uri} is a {'/'.join(sorted(description.flavors))} model, "
                "not the servable Pipeline on raw trip fields (it predates it): it cannot score raw trips"
            )
        return _load_with_running_package(local), dict(description.metadata or {})


def _load_with_running_package(local: str) -> Any:
    """The Pipeline saved at `local`, its classes taken from the running taxi_duration, not the model's copy.

    A servable model carries taxi_duration as it was when it was logged (`code_paths`), and MLflow 3
    prepends that copy to sys.path on load and never takes it off
    (mlflow.utils.model_utils._add_code_to_system_path). This module runs inside taxi_duration and
    imports taxi_duration.serving, so the saved class path taxi_duration.serving.TripFeaturizer
    resolves to the running package: a submodule is looked up on its package's __path__, not on
    sys.path. The copy comes off sys.path right after, so nothing later can find it: neither an
    import of a package it would shadow nor a process started from here (multiprocessing and Dask
    spawn theirs with this sys.path). Restoring sys.path keeps MLflow's public loader; loading
    without the prepend would need its private one.
    """
    import mlflow.sklearn

    before = set(sys.path)
    try:
        return mlflow.sklearn.load_model(local)
    finally:
        sys.path[:] = [entry for entry in sys.path if entry in before]


def version_run_id(tracking_uri: str, registered_model: str, version: str) -> str:
    """Id of the run that trained `version`.

    ModelVersion.run_id is set when a version is registered with a run id or from a logged
    model (the SQL store copies the LoggedModel's source_run_id); versions registered from
    some other source may lack it, so fall back to the logged model the source points at.
    """
    client = mlflow_runs.mlflow_client(tracking_uri)
    model_version = client.get_model_version(registered_model, version)
    if model_version.run_id:
        return model_version.run_id
    run_id = (model_version.tags or {}).get(VERSION_TAG_RUN_ID)
    if run_id:
        return run_id
    for uri in (model_version.source, (model_version.tags or {}).get(VERSION_TAG_MODEL_URI)):
        try:
            model_id = logged_model_id(uri or "")
        except ValueError:
            continue
        source_run_id = client.get_logged_model(model_id).source_run_id
        if source_run_id:
            return source_run_id
    raise RegistryError(f"{registered_model} version {version} (source {model_version.source}) names no run")


def _frame(validation_records: Sequence[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Validation trips as a frame, checked for the raw columns the servable model takes."""
    import pandas as pd

    frame = (
        validation_records if isinstance(validation_records, pd.DataFrame) else pd.DataFrame(list(validation_records))
    )
    missing = [column for column in serving.RAW_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"validation trips lack the column(s) {missing}; they have {list(frame.columns)}")
    return frame


def logged_model_id(model_uri: str) -> str:
    """`m-...` from "models:/m-...", the URI of a logged (not registered) MLflow 3 model."""
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else ""
    if not model_id or "/" in model_id or "@" in model_id:
        raise ValueError(
            f"expected a logged model URI 'models:/<model_id>' (as log_xgboost_model returns), got {model_uri!r}"
        )
    return model_id


def _champion_version(client: MlflowClient, registered_model: str) -> str | None:
    """The version the champion alias points at, or None (also when the model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(registered_model).aliases
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = aliases.get(CHAMPION_ALIAS)
    return None if version is None else str(version)


def _train_month_of(client: MlflowClient, registered_model: str, version: str) -> str | None:
    """The month `version` was trained on: its version tag, else its run's tag; None when neither says."""
    from mlflow.exceptions import MlflowException

    model_version = client.get_model_version(registered_model, version)
    tags = model_version.tags or {}
    if tags.get(VERSION_TAG_TRAIN_MONTH):
        return tags[VERSION_TAG_TRAIN_MONTH]
    run_id = model_version.run_id or tags.get(VERSION_TAG_RUN_ID)
    if not run_id:
        return None
    try:
        return client.get_run(run_id).data.tags.get(VERSION_TAG_TRAIN_MONTH) or None
    except MlflowException:  # the run was deleted: its month is unknown
        return None


def _create_version(
    client: MlflowClient,
    registered_model: str,
    logged_model: LoggedModel,
    run_id: str,
    validation_month: str,
    challenger_rmse: float,
    train_month: str | None = None,
) -> str:
    """Register the logged model as a new version of `registered_model`; return its number."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        client.create_registered_model(registered_model)
    except MlflowException as error:
        # Already registered (by an earlier run or a concurrent one): add a version to it.
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise

    model_uri = f"models:/{logged_model.model_id}"
    # Source is the logged model's artifact location, not "models:/m-...": given a models:/ source
    # the SQL registry store looks the LoggedModel up through the *global* tracking URI and fails
    # (or finds another store) when that is not `client`'s. The URI is kept as a version tag.
    model_version = client.create_model_version(
        name=registered_model,
        source=logged_model.artifact_location,
        run_id=run_id,
        tags={
            VERSION_TAG_RUN_ID: run_id,
            VERSION_TAG_VALIDATION_MONTH: validation_month,
            VERSION_TAG_VALIDATION_RMSE: repr(challenger_rmse),
            VERSION_TAG_MODEL_URI: model_uri,
            **({VERSION_TAG_TRAIN_MONTH: train_month} if train_month else {}),
        },
        model_id=logged_model.model_id,
    )
    version = str(model_version.version)

    # What mlflow.register_model does too: lets the LoggedModel page list its registered versions.
    entries = json.loads(client.get_logged_model(logged_model.model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entries.append({"name": registered_model, "version": version})
    client.set_logged_model_tags(logged_model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(entries)})
    return version


def _decide(
    registered_model: str,
    version: str,
    challenger_rmse: float,
    champion_rmse: float | None,
    champion_version: str | None,
    validation_month: str,
    not_servable: str | None = None,
    champion_train_month: str | None = None,
) -> PromotionDecision:
    comparison = NOT_COMPARED
    if not_servable is not None:
        reason = f"{not_servable}; version {version} becomes champion"
        promoted = True
    elif champion_version is not None and champion_train_month == validation_month:
        # Its score on its own training month would be in-sample: no fair comparison, so no change.
        reason = (
            f"champion v{champion_version} stays: no fair comparison, as it was trained on {validation_month}, "
            f"the validation month (challenger {challenger_rmse:.3f} is not compared with an in-sample score)"
        )
        promoted, comparison = False, NO_FAIR_COMPARISON
    elif champion_version is None or champion_rmse is None:
        if version == "1":
            reason = "first registered model becomes champion"
        else:
            reason = f"no {CHAMPION_ALIAS} alias on {registered_model}: version {version} becomes champion"
        promoted = True
    else:
        challenger_text, champion_text = _distinct(challenger_rmse, champion_rmse)
        promoted, comparison = challenger_rmse < champion_rmse, COMPARED
        if promoted:
            reason = (
                f"challenger RMSE {challenger_text} beats champion v{champion_version} "
                f"re-scored on {validation_month}: {champion_text}"
            )
        else:
            reason = (
                f"champion v{champion_version} ({champion_text} on {validation_month}) stays: "
                f"challenger {challenger_text} is not better"
            )
    return PromotionDecision(
        registered_model=registered_model,
        version=version,
        promoted=promoted,
        challenger_rmse=challenger_rmse,
        champion_rmse=champion_rmse,
        champion_version=champion_version,
        reason=reason,
        comparison=comparison,
    )


def _distinct(first: float, second: float) -> tuple[str, str]:
    """Both numbers with 3 decimals, or more when 3 would print two different RMSEs alike."""
    for decimals in range(3, 10):
        texts = f"{first:.{decimals}f}", f"{second:.{decimals}f}"
        if texts[0] != texts[1] or first == second:
            return texts
    return repr(first), repr(second)
