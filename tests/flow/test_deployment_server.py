"""The monthly deployment registered on a real Prefect server: a typed form, and the server's own
validation rejecting a bad value before any flow run exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from taxi_duration import settings
from taxi_duration.servers import endpoints

pytestmark = pytest.mark.flow

PROJECT_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registered():
    """(API URL, deployment id) of the monthly deployment applied to the tests' local Prefect server."""
    settings.apply_environment_defaults()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from taxi_duration.orchestration import deployment

    api = endpoints.ensure_prefect_server()
    with pytest.MonkeyPatch.context() as patch, temporary_settings({PREFECT_API_URL: api}):
        patch.chdir(PROJECT_DIR)  # the entrypoint is recorded relative to it, as serve.main() runs
        deployment_id = deployment.build_deployment(name="typed-form-check").apply()
    yield api, deployment_id
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api) as client:
        client.delete_deployment(deployment_id)


def test_the_deployment_form_is_typed_and_described(registered):
    from prefect.client.orchestration import SyncPrefectClient

    api, deployment_id = registered
    with SyncPrefectClient(api) as client:
        properties = client.read_deployment(deployment_id).parameter_openapi_schema["properties"]
    assert properties["color"]["enum"] == ["green", "yellow"]
    assert {"type": "integer", "minimum": 1, "maximum": 12} in properties["month"]["anyOf"]
    assert {"type": "null"} in properties["month"]["anyOf"] and {"type": "null"} in properties["year"]["anyOf"]
    assert {"type": "integer", "minimum": 2009, "maximum": 2100} in properties["year"]["anyOf"]
    assert properties["month"]["description"].startswith("Training month, 1-12")
    assert properties["force"]["description"].startswith("Rerun every stage")


@pytest.mark.parametrize(
    ("parameters", "reason"),
    [
        ({"color": "purple"}, "'purple' is not one of ['green', 'yellow']"),
        ({"month": 13}, "13 is greater than the maximum of 12"),
        ({"year": 1999, "month": 5}, "1999 is less than the minimum of 2009"),
    ],
)
def test_the_server_rejects_a_bad_value_before_a_run_is_created(registered, parameters, reason):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import PrefectHTTPStatusError

    api, deployment_id = registered
    with SyncPrefectClient(api) as client:
        with pytest.raises(PrefectHTTPStatusError, match="409") as rejected:
            client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
        assert reason in rejected.value.response.json()["detail"]
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        # The schedule's own future runs (the scheduler makes those due soon) are not this request's.
        assert [run for run in runs if not run.auto_scheduled] == []


def test_a_good_value_makes_a_run(registered):
    from prefect.client.orchestration import SyncPrefectClient

    api, deployment_id = registered
    with SyncPrefectClient(api) as client:
        flow_run = client.create_flow_run_from_deployment(deployment_id, parameters={"year": 2023, "month": 4})
        try:
            assert flow_run.parameters["month"] == 4 and flow_run.parameters["color"] == "green"
        finally:
            client.delete_flow_run(flow_run.id)  # no worker here: it would wait, scheduled, forever
