"""``python -m device_eval MODEL_FILE ...``: the same command as ``safeexport evaluate``."""

import sys

from commands.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]], prog_name="python -m device_eval")
