"""The Prefect side of the project: the pipeline and backfill flows and their command lines.

    request.py   a run's inputs resolved and checked once (RunRequest), and its stage plan
    stage.py     the Prefect tasks: fetch the trip files, run or reuse one notebook stage
    pipeline.py  the pipeline flow: the MLflow run, the stages in order, the records
    report.py    what a finished run leaves: run.json, the Prefect artifacts, the closing lines
    lost_server.py  a Prefect server lost mid-run: whether the run stands, said once
    cli.py       `python flows/pipeline.py ...` (flows/ holds the thin entry points)
    backfill.py  the backfill flow and its command line
    serve.py     the monthly scheduled deployment, served from one process (`make serve`)

Importing this package sets the environment Prefect reads when it is itself imported:
Prefect fixes its settings at import, so the project's defaults (settings.ENVIRONMENT_DEFAULTS,
each one only where the user set nothing) and the servers `make services` started must be in
the environment first. Doing it here, once, gives every way in the same environment: the
command lines, a Prefect worker loading the entrypoint `flows/pipeline.py:taxi_duration_pipeline`,
and a Dask worker importing the flow.

Prefect and MLflow are then imported with the collector paused (taxi_duration.runner.fast_start),
since every module here needs them.
"""

from taxi_duration import settings
from taxi_duration.runner import fast_start
from taxi_duration.servers import endpoints
from taxi_duration.tracking import mlflow_runs

settings.apply_environment_defaults()
endpoints.adopt_running_services()

with fast_start.imports_without_gc():
    import prefect  # noqa: F401 - imported here, once, with the collector paused

    mlflow_runs.import_mlflow()
