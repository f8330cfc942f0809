"""Local Prefect and MLflow servers without Docker, and which servers a run talks to."""
