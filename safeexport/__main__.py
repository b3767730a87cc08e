"""``python -m safeexport`` is the ``safeexport`` command."""

from safeexport.cli import main

main()
