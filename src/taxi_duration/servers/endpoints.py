"""Which servers a pipeline run talks to, and how it talks to Prefect's.

MLflow and Prefect servers that `make services` started are adopted unless the user chose
others; without a Prefect server, the project's persistent local one is started on first use
(taxi_duration.servers.local_servers) unless TAXI_PREFECT_SERVER=ephemeral asks for Prefect's temporary one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping

from taxi_duration import settings
from taxi_duration.servers.local_servers import SERVICE_FACTORIES, prefect_service, read_state, start


def running_environment() -> dict[str, str]:
    """The variables that point a run at the running servers (empty when none run).

    A server still starting (another process is waiting for it) is not adopted: the run would
    talk to it before it answers. Such a run goes through `start`, which waits for it.
    """
    return {
        state["env_var"]: state["env_value"]
        for name in SERVICE_FACTORIES
        if (state := read_state(name)) is not None and state.get("ready", True)
    }


def adopt_running_services(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Point this process at the running local servers, unless the user chose others.

    Returns what was set. Called by the flows before Prefect is imported.
    """
    adopted = {}
    for key, value in running_environment().items():
        if not environ.get(key):
            environ[key] = value
            adopted[key] = value
    return adopted


def ensure_prefect_server() -> str:
    """The running local Prefect server's API URL, starting it on first use."""
    return start(prefect_service())["env_value"]


@contextlib.contextmanager
def prefect_api_for_run() -> Iterator[str | None]:
    """Within this block, Prefect talks to the server a run should use; yields its API URL.

    PREFECT_API_URL set (by the user or `make services`): that server. Otherwise, in the
    default `local` mode, the project's persistent server, started on first use; in
    `ephemeral` mode, None: Prefect starts its temporary server itself.
    """
    url = os.environ.get("PREFECT_API_URL")
    if url or settings.prefect_server_mode() == "ephemeral":
        yield url
        return
    url = ensure_prefect_server()
    # Prefect read its settings at import, so the URL goes in through its settings context;
    # the environment carries it to child processes (notebooks, Dask workers).
    os.environ["PREFECT_API_URL"] = url
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


@contextlib.contextmanager
def without_flow_heartbeats() -> Iterator[None]:
    """Within this block, flow runs send no heartbeats, unless the user configured them.

    For runs started from the command line. Prefect 3.9 joins a flow run's heartbeat thread
    when the run ends, and that thread looks for its stop signal once a second, so every run
    ended up to a second late (docs/performance.md). Heartbeats drive the automations that mark
    deployment runs whose process died as crashed; a command-line run has its user watching
    (and the next pipeline start marks its MLflow run KILLED if the process died). Setting
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY (environment or Prefect profile) keeps them.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
