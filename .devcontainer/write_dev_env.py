"""Write `.env` for the dev container from `.env.example`, with fresh random secrets.

    python3 .devcontainer/write_dev_env.py [PROJECT_DIR]

Run by start-mlflow.sh. Every `change-me` becomes a random hex string (letters and digits:
safe inside connection URLs). In a GitHub Codespace the forwarded address of MLflow's port
is added to its allowed hosts and origins, so the UI works through Codespaces' forwarding.
An existing `.env` is never touched: it may hold the only copy of passwords a database
volume was initialized with.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

PLACEHOLDER = "change-me"
MLFLOW_CONTAINER_PORT = 5000


def codespace_mlflow_host(environ: dict[str, str]) -> str | None:
    """`<codespace>-5000.<forwarding domain>` inside a Codespace, else None."""
    name = environ.get("CODESPACE_NAME")
    domain = environ.get("GITHUB_CODESPACES_PORT_FORWARDING_DOMAIN")
    if not name or not domain:
        return None
    return f"{name}-{MLFLOW_CONTAINER_PORT}.{domain}"


def dev_env_text(example: str, environ: dict[str, str]) -> str:
    """The `.env` text: `example` with each placeholder replaced and Codespaces' host added."""
    forwarded_host = codespace_mlflow_host(environ)
    lines = []
    for line in example.splitlines():
        key, separator, value = line.partition("=")
        if separator and not line.lstrip().startswith("#"):
            if value == PLACEHOLDER:
                value = secrets.token_hex(20)
            elif forwarded_host and key == "MLFLOW_ALLOWED_HOSTS":
                value = f"{value},{forwarded_host}"
            elif forwarded_host and key == "MLFLOW_CORS_ALLOWED_ORIGINS":
                value = f"{value},https://{forwarded_host}"
            line = f"{key}={value}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_dev_env(project_dir: Path, environ: dict[str, str]) -> bool:
    """Create `<project_dir>/.env` (owner-only) unless it exists; True when written."""
    target = project_dir / ".env"
    if target.exists():
        return False
    example = project_dir / ".env.example"
    if not example.is_file():
        raise FileNotFoundError(f"{example} is missing: it is the template of .env")
    text = dev_env_text(example.read_text(), environ)
    # Created with owner-only permissions from the start: the file holds passwords.
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    return True


def main(argv: list[str]) -> int:
    project_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1]
    written = write_dev_env(project_dir, dict(os.environ))
    print(f"{project_dir / '.env'}: {'written with new random secrets' if written else 'exists, left as it is'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
