"""``--mlflow URI``: what compress, export and evaluate log, read back through MLflow's own
client from a local file store."""

import json

import pytest

from commands.api import _log_compress
from safeexport import evaluate, export
from safeexport.rundir import RunDir
from tests.conftest import FAST_EXPORT, cli, closed_port, one_error_line

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def uri(tmp_path, monkeypatch):
    # MLflow 3 refuses its file store unless told; a server or database URI needs nothing
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def _runs(uri: str) -> dict:
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("safeexport")
    return {r.info.run_name: (r, [a.path for a in client.list_artifacts(r.info.run_id)])
            for r in client.search_runs([exp.experiment_id])}


def test_each_command_logs_its_parameters_figures_and_files(run, uri, tmp_path):
    _log_compress(uri, RunDir(run))
    exp = export(run, out=tmp_path / "m.onnx", mlflow=uri, format="onnx", bits=8,
                 **FAST_EXPORT)
    ev = evaluate(exp.path, json_out=tmp_path / "e.json", mlflow=uri, attack_epochs=2)
    runs = _runs(uri)
    report = json.loads((run / "report.json").read_text())
    c, files = runs[f"compress {run.name}"]
    assert c.data.metrics["compressed.mia_acc"] == pytest.approx(report["compressed"]["mia_acc"])
    assert c.data.params["config.sparsity"] == "0.2"
    assert {"report.json", "config.json", "roc.png"} <= set(files)
    e, files = runs["export m.onnx"]
    assert e.data.params["bits"] == "8"
    assert e.data.metrics["sizes.bytes"] == exp.manifest["sizes"]["bytes"]
    assert {"m.onnx", "m.json"} <= set(files)
    v, files = runs["evaluate m.onnx"]
    assert v.data.metrics["after.task_acc"] == pytest.approx(ev.report["after"]["task_acc"])
    assert v.data.metrics["passed"] == float(ev.passed)
    assert {"e.json", "e.png"} <= set(files)


def test_an_unusable_tracking_uri_is_one_line(run, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    one_error_line(cli("export", "--run", run, "--out", tmp_path / "m.onnx", "--mlflow",
                       (tmp_path / "mlruns").as_uri()), "^error: --mlflow file://")
    assert not (tmp_path / "m.onnx").exists()  # refused before the work, not after it


def test_a_tracking_server_that_does_not_answer_is_refused_before_the_work(run, tmp_path):
    """MLflow's client retries a dead server for about four minutes: one TCP probe first."""
    port = closed_port()
    one_error_line(cli("export", "--run", run, "--out", tmp_path / "m.onnx", "--mlflow",
                       f"http://127.0.0.1:{port}"),
                   rf"^error: --mlflow http://127.0.0.1:{port}: nothing answers at "
                   rf"127.0.0.1:{port} \(Connection refused\); start the tracking server")
    assert not (tmp_path / "m.onnx").exists()
