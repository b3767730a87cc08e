"""``python -m safeexport`` is the ``safeexport`` command."""

from commands.cli import main

main()
