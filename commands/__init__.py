"""The command layer, above the stages: the ``safeexport`` command line (``cli``) and the public
Python API (``api``, re-exported as ``from safeexport import compress, export, evaluate,
study, replay``). It imports the stages; nothing imports it."""
