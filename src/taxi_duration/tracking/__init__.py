"""MLflow: runs and their files, input datasets, the registry, the champion gate and its lock."""
