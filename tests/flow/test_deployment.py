"""The scheduled deployment, as served (flows/serve.py) and as deployed (prefect.yaml).

Nothing here contacts a Prefect server: deployments are built, never registered or served.
Parameters are checked the way the Prefect server checks them (prefect's schema
validation), so an override that passes here is one `prefect deployment run -p` accepts.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from taxi_duration import settings
from taxi_duration.orchestration.schedule import (
    DEPLOYMENT_DESCRIPTION,
    DEPLOYMENT_NAME,
    DEPLOYMENT_TAGS,
    MONTHLY_CRON,
    SCHEDULE_TIMEZONE,
    deployment_parameters,
)

settings.apply_environment_defaults()  # before prefect is imported, as the entry points do

from prefect import Flow  # noqa: E402 - after the environment defaults, as above
from prefect.utilities.callables import parameter_schema  # noqa: E402 - as above
from prefect.utilities.schema_tools.validation import ValidationError, validate  # noqa: E402 - as above

PROJECT_DIR = Path(__file__).resolve().parents[2]
PREFECT_YAML = PROJECT_DIR / "prefect.yaml"
FLOW_PARAMETERS = ["year", "month", "color", "data_source", "experiment", "force"]
GOOD_OVERRIDES = [
    {"year": 2023, "month": 4, "color": "yellow"},
    {"year": 2023, "month": 4, "data_source": "/data/tlc", "experiment": "backfill", "force": True},
    {},
]
BAD_OVERRIDES = [{"month": "x"}, {"year": 2023.5}, {"force": "yes"}, {"color": 3}]


@pytest.fixture(scope="module")
def serve_module():
    """What flows/serve.py runs (taxi_duration.orchestration.deployment), imported without serving."""
    from taxi_duration.orchestration import deployment

    return deployment


@pytest.fixture(scope="module")
def pipeline_flow(serve_module) -> Flow:
    return serve_module.load_pipeline_flow()


@pytest.fixture(scope="module")
def deployment(serve_module):
    # Prefect records the entrypoint relative to the working directory; serve.main() runs
    # from the project folder, so build it from there too.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(PROJECT_DIR)
        return serve_module.build_deployment()


@pytest.fixture(scope="module")
def schema(pipeline_flow) -> dict:
    """The parameter schema Prefect registers for the flow (what the server enforces)."""
    return parameter_schema(pipeline_flow).model_dump()


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


@pytest.fixture(scope="module")
def yaml_deployment(prefect_yaml) -> dict:
    (monthly,) = [d for d in prefect_yaml["deployments"] if d["entrypoint"].startswith("flows/pipeline.py:")]
    return monthly


def check_defaults(parameters: dict, schema: dict) -> None:
    """As the server checks a deployment's default parameters (missing ones are allowed)."""
    validate(parameters, schema, raise_on_error=True, ignore_required=True)


def check_run(defaults: dict, overrides: dict, schema: dict) -> None:
    """As the server checks a flow run of a deployment: its defaults updated by the run's values."""
    validate({**defaults, **overrides}, schema, raise_on_error=True)


# --- the flow's parameters (the target signature) -----------------------------------------


def test_flow_takes_the_scheduled_parameters(pipeline_flow):
    assert pipeline_flow.name == "nyc-taxi-duration"
    # Others may follow; these are the ones the deployment and its overrides rely on.
    parameters = list(inspect.signature(pipeline_flow.fn).parameters)
    assert parameters[: len(FLOW_PARAMETERS)] == FLOW_PARAMETERS


def test_year_and_month_accept_none_so_a_run_picks_the_month(schema):
    check_defaults({"year": None, "month": None}, schema)


# --- build_deployment (what `python flows/serve.py` serves) -----------------------------------


def test_deployment_name_entrypoint_and_metadata(deployment):
    assert deployment.name == DEPLOYMENT_NAME == "monthly"
    assert deployment.flow_name == "nyc-taxi-duration"
    assert deployment.entrypoint == "flows/pipeline.py:taxi_duration_pipeline"
    assert deployment.tags == list(DEPLOYMENT_TAGS)
    assert deployment.description == DEPLOYMENT_DESCRIPTION
    assert deployment.enforce_parameter_schema is True


def test_deployment_runs_on_the_monthly_cron_in_utc(deployment):
    (scheduled,) = deployment.schedules
    assert scheduled.schedule.cron == MONTHLY_CRON
    assert scheduled.schedule.timezone == SCHEDULE_TIMEZONE == "UTC"
    assert scheduled.active is True


def test_deployment_defaults_pick_the_newest_month(deployment, schema):
    assert deployment.parameters == deployment_parameters()
    assert deployment.parameters["year"] is None and deployment.parameters["month"] is None
    check_defaults(deployment.parameters, schema)


@pytest.mark.parametrize("overrides", GOOD_OVERRIDES, ids=str)
def test_run_overrides_are_accepted(deployment, schema, overrides):
    check_run(deployment.parameters, overrides, schema)


@pytest.mark.parametrize("overrides", BAD_OVERRIDES, ids=str)
def test_wrongly_typed_overrides_are_rejected(deployment, schema, overrides):
    (name,) = overrides
    with pytest.raises(ValidationError, match=f"field '{name}'"):
        check_run(deployment.parameters, overrides, schema)


def test_build_deployment_takes_name_and_cron(serve_module, monkeypatch):
    monkeypatch.chdir(PROJECT_DIR)
    nightly = serve_module.build_deployment(name="nightly", cron="30 2 * * *")
    assert nightly.name == "nightly"
    assert nightly.schedules[0].schedule.cron == "30 2 * * *"


def test_serve_main_serves_the_built_deployment(serve_module, monkeypatch, tmp_path):
    import prefect

    served = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments, **_: served.extend(deployments))
    monkeypatch.chdir(tmp_path)  # main() moves to the project folder itself
    assert serve_module.main(["--name", "nightly", "--cron", "30 2 * * *"]) == 0
    only, scoring = served
    assert (only.name, only.schedules[0].schedule.cron) == ("nightly", "30 2 * * *")
    assert only.entrypoint == "flows/pipeline.py:taxi_duration_pipeline"
    # Scoring is served beside it, on demand: no schedule.
    assert (scoring.name, scoring.entrypoint) == ("score", "flows/score.py:taxi_duration_scoring")
    assert not scoring.schedules


def test_serve_main_rejects_a_bad_cron_before_serving(serve_module, monkeypatch, capsys):
    import prefect

    monkeypatch.setattr(prefect, "serve", lambda *_, **__: pytest.fail("must not serve"))
    monkeypatch.chdir(PROJECT_DIR)
    assert serve_module.main(["--cron", "every tuesday"]) == 2
    assert "Invalid cron string" in capsys.readouterr().err


# --- prefect.yaml (what `prefect deploy` registers) -------------------------------------------


def test_prefect_yaml_is_a_valid_prefect_deploy_file(prefect_yaml):
    # Prefect's own model of the file (private module: a Prefect upgrade that changes the
    # format fails here, which is the point).
    from prefect.cli.deploy._models import PrefectYamlModel

    PrefectYamlModel.model_validate(prefect_yaml)


def test_prefect_yaml_entrypoint_is_the_pipeline_flow(yaml_deployment, pipeline_flow):
    from prefect.flows import load_flow_from_entrypoint

    path, function = yaml_deployment["entrypoint"].split(":")
    assert (PROJECT_DIR / path).is_file()
    loaded = load_flow_from_entrypoint(f"{PROJECT_DIR / path}:{function}", use_placeholder_flow=False)
    assert loaded.name == pipeline_flow.name


def test_prefect_yaml_matches_the_served_deployment(yaml_deployment):
    assert yaml_deployment["name"] == DEPLOYMENT_NAME
    assert yaml_deployment["tags"] == list(DEPLOYMENT_TAGS)
    assert yaml_deployment["description"] == DEPLOYMENT_DESCRIPTION
    assert yaml_deployment["parameters"] == deployment_parameters()
    (scheduled,) = yaml_deployment["schedules"]
    assert scheduled["cron"] == MONTHLY_CRON
    assert scheduled["timezone"] == SCHEDULE_TIMEZONE


def test_prefect_yaml_parameters_fit_the_flow(yaml_deployment, pipeline_flow, schema):
    inspect.signature(pipeline_flow.fn).bind(**yaml_deployment["parameters"])
    check_defaults(yaml_deployment["parameters"], schema)


def test_prefect_yaml_uses_the_local_process_pool(yaml_deployment):
    assert yaml_deployment["work_pool"]["name"] == "local-process"


def test_prefect_yaml_runs_start_in_the_checkout_it_was_deployed_from(prefect_yaml):
    # The build step's output (the absolute path `prefect deploy` ran in) is the pull
    # step's directory: no machine-specific path in the file.
    (build,) = prefect_yaml["build"]
    (pull,) = prefect_yaml["pull"]
    step = "prefect.deployments.steps.set_working_directory"
    assert build[step] == {"id": "project", "directory": "."}
    assert pull[step] == {"directory": "{{ project.directory }}"}


def test_prefect_yaml_scoring_deployment_matches_the_served_one(prefect_yaml, serve_module, monkeypatch):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    monkeypatch.chdir(PROJECT_DIR)
    served = serve_module.build_scoring_deployment()
    (listed,) = [d for d in prefect_yaml["deployments"] if d["name"] == served.name]
    assert listed["entrypoint"] == served.entrypoint == "flows/score.py:taxi_duration_scoring"
    assert listed["parameters"] == served.parameters and listed["tags"] == served.tags
    assert " ".join(listed["description"].split()) == served.description
    assert "schedules" not in listed and listed["work_pool"]["name"] == "local-process"
    scoring_flow = load_flow_from_entrypoint(listed["entrypoint"], use_placeholder_flow=False)
    check_run(listed["parameters"], {"year": 2023, "month": 5}, parameter_schema(scoring_flow).model_dump())
