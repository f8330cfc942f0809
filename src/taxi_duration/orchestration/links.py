"""Links, not ids: where a run's results can be opened, for Prefect's link artifacts, the run
summaries (Prefect markdown and the MLflow run's description) and nothing else to keep in step.

- the MLflow run's page, when MLflow is a server;
- each review report: its MLflow artifact URL on a server, else a file:// URL;
- the comparison with last month, when there is one, and the run gallery (file:// URLs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from taxi_duration.tracking import mlflow_runs


@dataclass(frozen=True)
class RunLink:
    text: str
    url: str


def report_url(record: dict[str, Any], run_dir: Path, name: str) -> str:
    """Where a reader opens a report: through the MLflow server if there is one, else from disk."""
    if record.get("mlflow_url"):  # set only when the tracking URI is a server's
        return (
            f"{str(record['tracking_uri']).rstrip('/')}/get-artifact?path={quote(f'reports/{name}')}"
            f"&run_uuid={quote(str(record['mlflow_run_id']))}"
        )
    return (Path(run_dir) / name).resolve().as_uri()


def run_links(record: dict[str, Any], run_dir: Path, gallery_path: Path) -> list[RunLink]:
    """Every link a finished or failed run offers, in reading order."""
    links = []
    if record.get("mlflow_url"):
        links.append(RunLink(f"MLflow run {str(record['mlflow_run_id'])[:8]}", record["mlflow_url"]))
    for stage in record.get("stages", []):
        report = stage.get("review_report")
        if report and (Path(run_dir) / report).is_file():
            links.append(RunLink(f"{stage['stage']} review report", report_url(record, run_dir, report)))
    if record.get("comparison"):
        links.append(
            RunLink("what changed since last month", (Path(run_dir) / record["comparison"]).resolve().as_uri())
        )
    links.append(RunLink("all runs (gallery)", Path(gallery_path).resolve().as_uri()))
    return links


def markdown_list(links: list[RunLink]) -> str:
    return "\n".join(f"- [{link.text}]({link.url})" for link in links)


def publish(record: dict[str, Any], links: list[RunLink], summary_markdown: str) -> None:
    """One Prefect link artifact per link (on the flow run), and the summary as the MLflow run's description."""
    from prefect.artifacts import create_link_artifact

    for link in links:
        create_link_artifact(link=link.url, link_text=link.text, description=link.text)
    mlflow_runs.set_tags(
        str(record["tracking_uri"]), str(record["mlflow_run_id"]), {"mlflow.note.content": summary_markdown}
    )
