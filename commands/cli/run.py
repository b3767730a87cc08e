"""``safeexport run``: replay a recorded or hand-written config."""

from pathlib import Path

import click

from commands import api
from commands.cli.options import MLFLOW, RUN_OUT, TRUST, overwrite, progress


@click.command("run")
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@RUN_OUT
@overwrite("a previous run in --out")
@progress()
@MLFLOW
@TRUST
def command(config_file: Path, out: Path | None, overwrite: bool,
            progress: bool | None, mlflow: str | None, trust_code: bool) -> None:
    """Replay a run: compress again with the config a run recorded (RUN/config.json) or a
    hand-written YAML/JSON file of the same keys (see config.json's "config" entry; keys left
    out take the defaults of `safeexport compress`), into a new run directory. The file is
    validated with the same messages as the command line."""
    run = api.replay(config_file, out, overwrite=overwrite, progress=progress, mlflow=mlflow,
                     trust_code=trust_code)
    click.echo(f"run directory: {run.path}")
