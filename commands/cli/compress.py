"""``safeexport compress``."""

from pathlib import Path

import click

from commands import api
from commands.cli.options import (
    MLFLOW,
    RUN_OUT,
    TRUST,
    config_option,
    config_options,
    overwrite,
    progress,
)
from compressor.config import CompressConfig

# the options that decide how a model is trained, shared with `study` (which compares methods)
training_options = config_options(CompressConfig, skip=("method",))


@click.command("compress")
@config_option(CompressConfig, "method")
@training_options
@RUN_OUT
@click.option("--resume", is_flag=True,
              help="Continue the killed run in --out from its last checkpoint (its config.json "
                   "decides everything else).")
@overwrite("a previous run in --out")
@progress()
@MLFLOW
@TRUST
@click.pass_context
def command(ctx: click.Context, out: Path | None, resume: bool, overwrite: bool,
            progress: bool | None, mlflow: str | None, trust_code: bool, **flags) -> None:
    """Run SafeCompress: sparse training where every mask update makes candidates (prune x grow),
    a simulated membership-inference attacker tests each, and the best task-accuracy /
    attack-accuracy trade-off (TM-score) survives. --method NAME trains one of the baselines
    (see --method) into the same kind of run directory instead.

    Writes config.json, splits.npz, model.safetensors, attacker.safetensors, history.jsonl,
    report.json, curve.png and roc.png into the run directory.
    """
    if resume:  # the recorded config decides: only what was typed is passed (and refused)
        given = {k: v for k, v in flags.items()
                 if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
        run = api.compress(out, resume=True, progress=progress, mlflow=mlflow,
                           trust_code=trust_code, **given)
    else:
        run = api.compress(out, overwrite=overwrite, progress=progress, mlflow=mlflow, **flags)
    click.echo(f"run directory: {run.path}")
