"""The ``safeexport`` command line: one module per command, each turning flags into a stage
config and calling the API (commands/api.py, where every refusal is decided); the options
several commands share are declared once (options.py), the printing is in printers.py. This
module only registers the commands on the group."""

from commands.cli import compress, evaluate, export, report, run, study
from commands.cli.group import main

for _module in (compress, run, export, evaluate, study, report):
    main.add_command(_module.command)

__all__ = ["main"]
