"""``safeexport report``: the HTML page, rendered in a real headless browser (Debian's
Chromium, which .ci/run installs; skipped only where no browser is found), and its refusals."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_eval import evaluate
from device_eval.config import EvalConfig
from safeexport.errors import ConfigError
from safeexport.html_report import EXPOSED_SHOWN, beats_chance, write_report
from safeexport.metrics import flagged_fpr
from safeexport.runio import open_run
from tests.conftest import cli

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    if BROWSER is None:
        if os.environ.get("CI"):  # .ci/run installs it: a missing browser there is a failure
            pytest.fail("chromium is not installed; .ci/run should have installed it")
        pytest.skip("no headless browser (apt-get install chromium)")
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", *args], capture_output=True, text=True,
                          check=True)


@pytest.fixture(scope="module")
def reported(run, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny run, in a folder whose name holds markup, with one evaluated
    export, and its report."""
    copy = tmp_path_factory.mktemp("report") / "run<b>x"
    shutil.copytree(run, copy)
    evaluate(copy / "exports" / "model-onnx-w8-weight-only.onnx", EvalConfig(attack_epochs=2),
             copy)
    result = cli("report", copy)
    assert result.returncode == 0, result.stderr
    return copy, copy / "report.html"


def test_the_report_renders_in_a_browser_with_its_plots_and_figures(reported, tmp_path):
    run, page = reported
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    verdict = json.loads(next((run / "evals").glob("*.json")).read_text())["verdict"]
    outcome = verdict["outcome"]  # the browser serialises the attribute quoted
    assert f'<span class="{outcome.lower()}">{outcome}</span>' in dom
    manifest = json.loads((run / "exports" / "model-onnx-w8-weight-only.json").read_text())
    assert manifest["sha256"] in dom  # the export table and the hashes
    assert open_run(run).read_report()["files"]["model.safetensors"] in dom
    assert "run&lt;b&gt;x" in dom and "run<b>x" not in dom  # file text is escaped
    assert dom.count('src="data:image/png;base64,') == 3  # ROC, learning curve, eval ROC
    assert "<script" not in page.read_text()
    exposed = dom.split("Most exposed records")[1].split("</table>")[0]
    assert exposed.count("<tr>") == EXPOSED_SHOWN + 1  # header + the records
    # the ranking carries its caveat exactly when no attack's interval excludes chance
    row = open_run(run).read_report()["compressed"]
    intervals = [m["ci"][k] for m in (row, *row["threshold_attacks"].values())
                 for k in ("mia_acc", "auc")]
    noise = all(lo <= 0.5 <= hi for lo, hi in intervals)
    assert ("No attack measurably beats chance" in exposed) == noise
    assert beats_chance(row) != noise

    shot = tmp_path / "shot.png"
    _chromium("--window-size=1200,3000", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (3000, 1200)
    # matplotlib's first line colour (31, 119, 180) appears only where a plot was drawn
    blue = (np.abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 30).sum()
    assert blue > 200, blue


def test_the_report_refuses_to_overwrite_a_users_file_and_non_html(reported, tmp_path):
    run, _ = reported
    mine = tmp_path / "mine.html"
    mine.write_text("keep me")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        write_report(run, mine)
    assert mine.read_text() == "keep me"
    with pytest.raises(ConfigError, match="name it \\*.html"):
        write_report(run, tmp_path / "report.json")
    assert write_report(run, mine, overwrite=True) == mine
    assert "Most exposed records" in mine.read_text()


def test_flagged_fpr_is_the_share_of_nonmembers_scoring_at_least_as_high():
    nonmembers = np.array([0.1, 0.2, 0.2, 0.5])
    assert flagged_fpr(np.array([0.6, 0.5, 0.2, 0.0]), nonmembers).tolist() == \
        [0.0, 0.25, 0.75, 1.0]


def test_beats_chance_reads_every_attacks_interval():
    def row(*intervals, refs=()):
        ci = [{"ci": {"mia_acc": i, "auc": [0.45, 0.55]}} for i in intervals]
        out = {**ci[0], "threshold_attacks": dict(enumerate(ci[1:]))}
        if refs:
            out["reference_attacks"] = {"settings": {}, "lira": {"ci": {"auc": refs}}}
        return out

    assert not beats_chance(row([0.45, 0.55], [0.48, 0.6]))
    assert beats_chance(row([0.45, 0.55], [0.51, 0.6]))  # a threshold attack
    assert beats_chance(row([0.40, 0.49], [0.48, 0.6]))  # below chance beyond the noise
    assert beats_chance(row([0.45, 0.55], refs=[0.52, 0.7]))  # LiRA's AUC
    assert not beats_chance(row([0.45, 0.55], refs=[0.42, 0.7]))

