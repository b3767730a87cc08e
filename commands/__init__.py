"""The command layer, above the stages: the ``safeexport`` command line (``cli``) and the public
Python API (``api``, re-exported as ``from safeexport import compress, export, evaluate,
study, replay``). It imports the stages; nothing imports it."""

from safeexport.openmp import set_wait_policy

set_wait_policy()  # before any module of this package loads torch (safeexport/openmp.py)
