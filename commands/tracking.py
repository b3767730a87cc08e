"""``--mlflow URI``: log a command's parameters, figures and files to an MLflow tracking server
(the optional ``mlflow`` extra, mlflow-skinny). One MLflow run per command, named after the
command and its output; nothing is logged when the command fails."""

from pathlib import Path

from safeexport.errors import ConfigError


def _flat(prefix: str, value, out: dict) -> None:
    """Nested dicts as dotted keys; None and empty values left out (MLflow wants scalars)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list | tuple):
        if value:
            out[prefix] = ",".join(map(str, value))
    elif value is not None:
        out[prefix] = value


def _mlflow():
    try:
        import mlflow
    except ImportError as e:
        raise ConfigError("--mlflow needs MLflow: pip install 'safeexport[mlflow]'") from e
    return mlflow


def check(uri: str) -> None:
    """Refuse a tracking URI MLflow cannot use BEFORE the command does its work (a failure
    found only when logging would leave the work done and the command failed)."""
    from urllib.parse import urlsplit

    from safeexport.network import check_reachable

    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    url = urlsplit(uri)
    if url.scheme in ("http", "https"):  # MLflow's client retries a dead server for minutes
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError as e:
            raise ConfigError(f"--mlflow {uri}: {e}") from e
        check_reachable(url.hostname or "", port, f"--mlflow {uri}",
                        "start the tracking server or fix the URI")
    try:
        mlflow.tracking.MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        raise ConfigError(f"--mlflow {uri}: {str(e).splitlines()[0]}") from e


def log_run(uri: str, name: str, params: dict, metrics: dict, files: list[Path]) -> str:
    """Log ``params`` (nested, flattened), the numeric ``metrics`` (None = not measurable,
    left out) and the existing ``files`` as one MLflow run under the experiment
    "safeexport"; returns the MLflow run id."""
    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    flat_params, flat_metrics = {}, {}
    _flat("", params, flat_params)
    _flat("", metrics, flat_metrics)
    numeric = {k: float(v) for k, v in flat_metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("safeexport")
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_params({k: str(v)[:6000] for k, v in flat_params.items()})
            mlflow.log_metrics(numeric)
            for f in files:
                if f.is_file():
                    mlflow.log_artifact(str(f))
            return run.info.run_id
    except MlflowException as e:
        raise ConfigError(f"--mlflow {uri}: {str(e).splitlines()[0]}") from e
