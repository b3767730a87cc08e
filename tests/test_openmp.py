"""OpenMP's idle spin (safeexport/openmp.py): every way of starting the project puts the
project's ``GOMP_SPINCOUNT`` in place before torch loads its OpenMP runtime, and a user's own
setting is kept. What libgomp itself read is checked, not only the environment: with
``OMP_DISPLAY_ENV=verbose`` it prints its settings when torch loads it, among them the spin
count (300000 when nothing is set, 0 under OMP_WAIT_POLICY=PASSIVE, 3e10 under ACTIVE)."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from safeexport import openmp
from tests.conftest import HANG_GUARD_S, REPO

SPIN = re.compile(r"GOMP_SPINCOUNT = '(\d+)'")


def _spincount(argv: list[str], **env: str) -> int:
    """The spin count libgomp reports in a fresh process started with ``argv``, in an
    environment without the test run's own OpenMP settings plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in openmp.USER_KEYS}
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S,
                       env={**base, "PYTHONPATH": str(REPO), "OMP_DISPLAY_ENV": "verbose", **env})
    found = SPIN.findall(r.stderr)
    assert found, (r.returncode, r.stderr[-2000:])  # torch (and so libgomp) was loaded
    return int(found[0])


# Each starts the way a user does, and each loads torch: a refusal of a missing run or file
# comes after the stage's imports.
ENTRY_POINTS = {
    "safeexport (console script)": [str(Path(sys.executable).with_name("safeexport")),
                                    "report", "/nonexistent-run"],
    "python -m safeexport": [sys.executable, "-m", "safeexport", "export", "--run",
                             "/nonexistent-run"],
    "python -m device_eval": [sys.executable, "-m", "device_eval", "/nonexistent.onnx"],
    "the Python API": [sys.executable, "-c", "from safeexport import compress\nimport torch"],
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_starts_torch_with_the_projects_spin_count(entry):
    assert _spincount(ENTRY_POINTS[entry]) == int(openmp.SPIN_COUNT)


def test_a_users_own_policy_or_spin_count_is_kept():
    argv = ENTRY_POINTS["python -m safeexport"]
    assert _spincount(argv, OMP_WAIT_POLICY="ACTIVE") == 30_000_000_000
    assert _spincount(argv, OMP_WAIT_POLICY="PASSIVE") == 0
    assert _spincount(argv, GOMP_SPINCOUNT="1234") == 1234
    # the check is not vacuous: with the project's own call bypassed, libgomp spins
    assert _spincount([sys.executable, "-c", "import torch"]) == 300_000


def test_torch_loaded_first_warns_and_the_policy_still_reaches_children(monkeypatch):
    for k in openmp.USER_KEYS:
        monkeypatch.delenv(k, raising=False)
    assert "torch" in sys.modules  # the test run itself has loaded it
    with pytest.warns(RuntimeWarning, match="import safeexport first"):
        openmp.set_wait_policy()
    assert os.environ["GOMP_SPINCOUNT"] == openmp.SPIN_COUNT
    assert openmp.policy_env() == {"GOMP_SPINCOUNT": openmp.SPIN_COUNT}


def test_a_user_setting_is_neither_replaced_nor_warned_about(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        openmp.set_wait_policy()
    assert "GOMP_SPINCOUNT" not in os.environ
    assert openmp.policy_env() == {"OMP_WAIT_POLICY": "passive"}
