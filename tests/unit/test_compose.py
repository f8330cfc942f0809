"""The team deployment files: docker-compose.yaml, the Dockerfiles, .env.example, the devcontainer.

Nothing here starts a container (no Docker engine is needed): the compose file is read as
data and checked against the rules it promises in its header, and against the project
(requirements/runtime.txt, prefect.yaml). When the `docker compose` CLI plugin is installed, its
own validation runs too (it needs no daemon).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from taxi_duration.servers.local_servers import MLFLOW_SERVER_DEFAULTS

from .test_install_path import locked_versions

PROJECT_DIR = Path(__file__).resolve().parents[2]
COMPOSE_FILE = PROJECT_DIR / "docker-compose.yaml"
ENV_EXAMPLE = PROJECT_DIR / ".env.example"
PIPELINE_DOCKERFILE = PROJECT_DIR / "Dockerfile"
MLFLOW_DOCKERFILE = PROJECT_DIR / "deploy" / "mlflow.Dockerfile"
DEVCONTAINER_DIR = PROJECT_DIR / ".devcontainer"

SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|ACCESS|AUTH", re.IGNORECASE)
# ${VAR}, ${VAR:-default}, ${VAR:?message}; `$${...}` is compose's escape for the container's shell.
COMPOSE_REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:[:]?[-?+][^}]*)?\}")
URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:([^@\s]+)@")
PLACEHOLDER = "change-me"


def is_secret_name(key: str) -> bool:
    """PREFECT_AUTH_PASSWORD is a secret; PREFECT_AUTH_USER, a user name, is not."""
    return bool(SECRET_NAME.search(key)) and not key.endswith("_USER")


def compose_text_without_comments() -> str:
    return "\n".join(line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, separator, value = line.partition("=")
            assert separator, f".env.example: not KEY=value: {line!r}"
            pairs[key.strip()] = value
    return pairs


def is_one_shot(service: dict) -> bool:
    return service.get("restart") == "no"


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=value list form
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_text(service: dict) -> str:
    command = service.get("command") or ""
    return " ".join(command) if isinstance(command, list) else str(command)


def only_references(value: str) -> bool:
    """True when `value` is made of ${...} references (and separators) alone."""
    return bool(COMPOSE_REFERENCE.search(value)) and not re.search(r"[A-Za-z0-9]", COMPOSE_REFERENCE.sub("", value))


def locked_version(package: str) -> str:
    versions = locked_versions(PROJECT_DIR / "requirements" / "runtime.txt")
    assert package.lower() in versions, f"{package} is not in requirements/runtime.txt"
    return versions[package.lower()]


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    assert match, f"{dockerfile.name}: no `ARG {name}=...`"
    return match.group(1)


def dockerfile_instructions(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, one string each: comments dropped, continuations joined."""
    instructions: list[str] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pending = f"{pending} {line.strip()}" if pending else line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            instructions.append(" ".join(pending.split()))
            pending = ""
    return instructions


def makefile_uv_version() -> str:
    match = re.search(r"^UV_VERSION := (\S+)$", (PROJECT_DIR / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile: no `UV_VERSION := ...`"
    return match.group(1)


# --- services ---------------------------------------------------------------------------------


def test_the_stack_has_the_services_of_the_topology(services):
    expected = {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "prefect-deploy", "prefect-worker"}
    assert expected <= set(services)


def test_every_service_has_an_image_or_a_build(services):
    for name, service in services.items():
        assert "image" in service or "build" in service, name


def test_images_pulled_from_a_registry_are_pinned(services):
    for name, service in services.items():
        if "build" in service:
            continue
        image = service["image"]
        _, _, tag = image.rpartition(":")
        assert tag and "/" not in tag and tag != "latest", f"{name}: {image} has no pinned tag"


def test_build_contexts_and_dockerfiles_exist(services):
    built = {name: service["build"] for name, service in services.items() if "build" in service}
    assert {"mlflow", "prefect-worker", "prefect-deploy"} <= set(built)
    for name, build in built.items():
        context = PROJECT_DIR / build["context"]
        assert context.is_dir(), f"{name}: no build context {context}"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no {build.get('dockerfile')}"


def test_long_running_services_have_healthchecks_and_one_shots_are_marked(services):
    # The rule of the compose file's header: a one-shot job says `restart: "no"` and has no
    # healthcheck (an exited container is never healthy); everything else restarts and has one.
    one_shots = {name for name, service in services.items() if is_one_shot(service)}
    assert one_shots == {"minio-init", "prefect-deploy"}
    for name, service in services.items():
        if name in one_shots:
            assert "healthcheck" not in service, f"{name}: a one-shot job with a healthcheck"
        else:
            assert service.get("restart") == "unless-stopped", name
            test = service.get("healthcheck", {}).get("test")
            assert test and test != ["NONE"], f"{name}: a long-running service without a healthcheck"


def test_depends_on_waits_for_health_or_completion(services):
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on without conditions only waits for a start"
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            expected = "service_completed_successfully" if is_one_shot(services[dependency]) else "service_healthy"
            assert spec.get("condition") == expected, f"{name} -> {dependency}"


def test_the_worker_starts_after_both_servers_and_the_deployment(services):
    assert set(services["prefect-worker"]["depends_on"]) == {"prefect-server", "mlflow", "prefect-deploy"}
    assert set(services["mlflow"]["depends_on"]) == {"postgres", "minio", "minio-init"}


def test_published_ports_bind_the_loopback_only(services):
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert {"mlflow", "prefect-server"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r} is not on 127.0.0.1"
    assert not services["postgres"].get("ports"), "the database is reachable on the compose network only"


# --- secrets ----------------------------------------------------------------------------------


def test_secret_looking_environment_values_are_references(services):
    for name, service in services.items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert only_references(value), f"{name}: {key} must come from .env as ${{...}}, not {value!r}"


def test_no_password_is_written_into_a_url(services):
    for name, service in services.items():
        texts = [command_text(service), *environment(service).values()]
        for text in texts:
            for password in URL_CREDENTIALS.findall(text):
                assert only_references(password), f"{name}: a password written into {text!r}"


def test_required_secrets_fail_clearly_when_missing():
    # `${VAR:?message}`: docker compose stops naming the variable, instead of starting a
    # database with an empty password.
    text = compose_text_without_comments()
    for variable in (
        "POSTGRES_PASSWORD",
        "MLFLOW_DB_PASSWORD",
        "PREFECT_DB_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "PREFECT_AUTH_PASSWORD",
    ):
        uses = re.findall(rf"(?<!\$)\$\{{{variable}([^}}]*)\}}", text)
        assert uses, f"{variable} is not used"
        assert all(use.startswith(":?") for use in uses), f"{variable}: every use must be ${{{variable}:?...}}"


def test_every_variable_the_compose_file_uses_is_in_env_example():
    used = set(COMPOSE_REFERENCE.findall(compose_text_without_comments()))
    assert "POSTGRES_PASSWORD" in used  # the pattern finds references at all
    missing = used - set(env_example())
    assert not missing, f"not in .env.example: {sorted(missing)}"


def test_env_example_holds_placeholders_not_secrets():
    assert is_secret_name("MINIO_ROOT_PASSWORD") and not is_secret_name("PREFECT_AUTH_USER")
    for key, value in env_example().items():
        if is_secret_name(key):
            assert value == PLACEHOLDER, f".env.example: {key} must be {PLACEHOLDER!r}, not a real value"


def test_env_is_ignored_by_git_and_its_template_is_not():
    if shutil.which("git") is None or not (PROJECT_DIR / ".git").exists():
        pytest.skip("needs git and a checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=PROJECT_DIR)
    template = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=PROJECT_DIR)
    assert ignored.returncode == 0, ".env is not git-ignored"
    assert template.returncode == 1, ".env.example is git-ignored"


def test_secrets_stay_out_of_docker_build_contexts():
    ignored = (PROJECT_DIR / ".dockerignore").read_text().split()
    for entry in (".env", ".venv", "data", "outputs", "mlflow.db", "mlruns", "mlartifacts", ".git", ".services"):
        assert entry in ignored, f".dockerignore: {entry}"


# --- the servers ------------------------------------------------------------------------------


def test_mlflow_server_uses_postgres_and_serves_s3_artifacts(services):
    command = services["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]

    def option(flag: str) -> str:
        assert flag in command, f"mlflow server without {flag}"
        return command[command.index(flag) + 1]

    assert "--serve-artifacts" in command
    # The driver named in the URI is the one deploy/mlflow.Dockerfile installs.
    assert option("--backend-store-uri").startswith("postgresql+psycopg://")
    assert option("--artifacts-destination").startswith("s3://")
    assert option("--allowed-hosts").startswith("${MLFLOW_ALLOWED_HOSTS")
    assert option("--host") == "0.0.0.0"
    assert option("--workers") == "1"  # more: every keep-alive request waits 40 ms (services.py)
    assert environment(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # The same server settings as `make services` (services.MLFLOW_SERVER_DEFAULTS).
    for key, value in MLFLOW_SERVER_DEFAULTS.items():
        assert environment(services["mlflow"]).get(key) == value, key


def test_mlflow_allowed_hosts_include_the_name_the_worker_uses(services):
    tracking_uri = environment(services["prefect-worker"])["MLFLOW_TRACKING_URI"]
    worker_host = tracking_uri.removeprefix("http://").rstrip("/")
    assert worker_host in env_example()["MLFLOW_ALLOWED_HOSTS"].split(",")


def test_mlflow_image_is_constrained_by_the_lock():
    # A client newer than its server calls endpoints the server may lack: the server installs
    # MLflow (and the driver) under the runtime lock as constraints, so both move together.
    instructions = dockerfile_instructions(MLFLOW_DOCKERFILE)
    assert "COPY requirements/runtime.txt /tmp/runtime.txt" in instructions
    (install,) = [line for line in instructions if "pip install" in line]
    steps = [step.split() for step in install.removeprefix("RUN ").split(" && ")]
    assert steps[0] == ["pip", "install", "uv==${UV_VERSION}"]
    assert steps[1][:6] == ["uv", "pip", "install", "--system", "-c", "/tmp/runtime.txt"]
    assert "mlflow" in steps[1] and '"psycopg[binary]"' in steps[1]
    assert locked_version("mlflow")
    assert dockerfile_arg(MLFLOW_DOCKERFILE, "UV_VERSION") == makefile_uv_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", dockerfile_arg(MLFLOW_DOCKERFILE, "BOTO3_VERSION"))


def test_prefect_server_image_matches_the_locked_client(services):
    image = services["prefect-server"]["image"]
    assert image == f"prefecthq/prefect:{locked_version('prefect')}-python3.11"
    env = environment(services["prefect-server"])
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    assert "--host" in services["prefect-server"]["command"]


def test_pipeline_containers_reach_both_servers(services):
    for name in ("prefect-worker", "prefect-deploy"):
        env = environment(services[name])
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api", name
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert services[name]["build"]["dockerfile"] == "Dockerfile", name


def test_worker_polls_the_pool_prefect_yaml_deploys_to(services):
    deployments = yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())["deployments"]
    pools = {deployment["work_pool"]["name"] for deployment in deployments}
    worker = services["prefect-worker"]["command"]
    assert worker[:3] == ["prefect", "worker", "start"]
    assert worker[worker.index("--pool") + 1] in pools
    assert "--with-healthcheck" in worker
    deploy = command_text(services["prefect-deploy"])
    assert "prefect --no-prompt deploy --all" in deploy
    assert all(f"work-pool create {pool} --type process" in deploy for pool in pools)


def test_postgres_init_script_creates_both_databases(services):
    mounts = services["postgres"]["volumes"]
    init_mounts = [mount for mount in mounts if "/docker-entrypoint-initdb.d/" in mount]
    assert len(init_mounts) == 1
    script = PROJECT_DIR / init_mounts[0].split(":")[0]
    text = script.read_text()
    for database in ("mlflow", "prefect"):
        assert f"CREATE DATABASE {database} OWNER {database};" in text
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


# --- the pipeline image -----------------------------------------------------------------------


def test_pipeline_image_installs_the_runtime_lock_only():
    instructions = dockerfile_instructions(PIPELINE_DOCKERFILE)
    assert instructions[0] == "FROM python:3.11-slim"
    installs = [line for line in instructions if "pip " in line]
    # uv outside the environment, the runtime lock exactly, then the package without dependencies.
    assert installs == [
        "RUN pip install uv==${UV_VERSION}",
        "RUN python -m venv /app/.venv && uv pip sync --require-hashes requirements/runtime.txt",
        "RUN uv pip install --no-deps -e .",
    ]
    assert dockerfile_arg(PIPELINE_DOCKERFILE, "UV_VERSION") == makefile_uv_version()
    copied = [line for line in instructions if line.startswith("COPY")]
    assert [line for line in copied if "requirements" in line] == ["COPY requirements/runtime.txt requirements/"]
    assert not any("dev.txt" in line or "[dev]" in line for line in installs + copied), "no dev lock or dev extra"
    for source in ("notebooks/", "flows/", "src/", "prefect.yaml"):
        assert any(source in line for line in copied), source
    users = [line for line in instructions if line.startswith("USER ")]
    assert users and users[-1] != "USER root", "the image must run as an unprivileged user"


# --- docker compose's own validation ----------------------------------------------------------


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_compose_config(env_file: Path) -> subprocess.CompletedProcess:
    # A clean environment: a variable set in the caller's shell would override the env file.
    clean = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run(
        ["docker", "compose", "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=PROJECT_DIR,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


needs_docker_compose = pytest.mark.skipif(
    not docker_compose_available(),
    reason="the docker compose CLI plugin is not installed (`docker compose version` fails)",
)


@needs_docker_compose
def test_docker_compose_accepts_the_file_with_env_example():
    completed = run_compose_config(ENV_EXAMPLE)
    assert completed.returncode == 0, completed.stderr


@needs_docker_compose
def test_docker_compose_refuses_to_run_without_the_secrets(tmp_path):
    partial = tmp_path / "partial.env"
    partial.write_text(
        "".join(f"{key}={value}\n" for key, value in env_example().items() if key != "POSTGRES_PASSWORD")
    )
    completed = run_compose_config(partial)
    assert completed.returncode != 0
    assert "POSTGRES_PASSWORD" in completed.stderr


# --- the dev container ------------------------------------------------------------------------


def read_jsonc(path: Path) -> dict:
    """devcontainer.json allows // comment lines; no value here contains `//` at a line start."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("//")]
    return json.loads("\n".join(lines))


@pytest.fixture(scope="module")
def dev_env_module(script_as_module) -> ModuleType:
    with script_as_module(DEVCONTAINER_DIR / "write_dev_env.py", "write_dev_env_under_test") as module:
        yield module


def test_devcontainer_keeps_make_env_and_starts_mlflow():
    config = read_jsonc(DEVCONTAINER_DIR / "devcontainer.json")
    assert config["postCreateCommand"] == "make env"
    assert {5000, 4200, 8888} <= set(config["forwardPorts"])
    assert any("docker-in-docker" in feature for feature in config["features"])
    script = config["postStartCommand"].split()[-1]
    text = (PROJECT_DIR / script).read_text()
    assert "docker compose up -d --wait mlflow" in text
    assert config["remoteEnv"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_dev_env_replaces_every_placeholder(dev_env_module, tmp_path):
    (tmp_path / ".env.example").write_text(ENV_EXAMPLE.read_text())
    assert dev_env_module.write_dev_env(tmp_path, {}) is True
    written = (tmp_path / ".env").read_text()
    values = dict(line.split("=", 1) for line in written.splitlines() if line and not line.startswith("#"))
    assert set(values) == set(env_example())
    assert PLACEHOLDER not in values.values()
    secrets = [values[key] for key in values if env_example()[key] == PLACEHOLDER]
    assert len(secrets) >= 5 and len(set(secrets)) == len(secrets)
    assert all(re.fullmatch(r"[0-9a-f]{40}", secret) for secret in secrets)
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0, ".env must be readable by its owner only"


def test_dev_env_never_overwrites_an_existing_env(dev_env_module, tmp_path):
    (tmp_path / ".env.example").write_text(ENV_EXAMPLE.read_text())
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=the-one-the-volume-has\n")
    assert dev_env_module.write_dev_env(tmp_path, {}) is False
    assert (tmp_path / ".env").read_text() == "POSTGRES_PASSWORD=the-one-the-volume-has\n"


def test_dev_env_allows_the_codespaces_forwarded_host(dev_env_module):
    environ = {"CODESPACE_NAME": "fuzzy-tribble", "GITHUB_CODESPACES_PORT_FORWARDING_DOMAIN": "app.github.dev"}
    text = dev_env_module.dev_env_text(ENV_EXAMPLE.read_text(), environ)
    values = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert "fuzzy-tribble-5000.app.github.dev" in values["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert "https://fuzzy-tribble-5000.app.github.dev" in values["MLFLOW_CORS_ALLOWED_ORIGINS"].split(",")
    assert "mlflow:5000" in values["MLFLOW_ALLOWED_HOSTS"].split(",")


def test_dev_env_needs_its_template(dev_env_module, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.env\.example is missing"):
        dev_env_module.write_dev_env(tmp_path, {})
