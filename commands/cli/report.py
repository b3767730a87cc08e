"""``safeexport report``: one HTML page of a run."""

from pathlib import Path

import click

from commands import api
from commands.cli.options import DATA_DIR, TRUST, overwrite


@click.command("report")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page (default RUN/report.html).")
@overwrite("an existing --out file")
@DATA_DIR
@TRUST
def command(run_dir: Path | None, out: Path | None, overwrite: bool,
            data_dir: Path | None, trust_code: bool) -> None:
    """One self-contained HTML page of RUN_DIR (default: the newest finished run under runs/)
    to hand to a reviewer: the verdicts on its evaluated exports, every figure with its 95%
    interval, the strongest attack, the ROC from FPR = 1/N, the most exposed records, the
    export table and every recorded hash. Plots are embedded; the page loads nothing."""
    path = api.report(run_dir, out=out, overwrite=overwrite, data_dir=data_dir,
                      trust_code=trust_code)
    click.echo(f"wrote {path}")
