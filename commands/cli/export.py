"""``safeexport export``: quantize and convert a run's model, checked."""

import sys
from pathlib import Path

import click

from commands import api
from commands.cli import printers
from commands.cli.options import (
    DATA_DIR,
    MLFLOW,
    RUN_DIR,
    TRUST,
    config_options,
    overwrite,
    progress,
)
from exporters.config import ExportConfig


@click.command("export")
@RUN_DIR
@config_options(ExportConfig)
@DATA_DIR
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default RUN/exports/model-<format>-w<bits>-<scheme>[-asym][-ft<N>]"
                   ".<suffix>); its manifest is written beside it as .json.")
@click.option("--all", "all_variants", is_flag=True,
              help="Export every format x bit width (weight-only) and print one table.")
@overwrite("an existing export")
@progress("Progress bar for --all")
@MLFLOW
@TRUST
def command(run_dir: Path | None, out: Path | None, all_variants: bool, overwrite: bool,
            data_dir: Path | None, progress: bool | None, mlflow: str | None,
            trust_code: bool, **flags) -> None:
    """Quantize the run's model and convert it to ONNX or TFLite for phones.

    Every file is run in its own runtime (onnxruntime, LiteRT) on the run's test split and
    compared with the PyTorch model, then read back to verify the stored bit widths and that
    pruned weights are still zero; the figures go into a manifest beside the file.
    """
    if all_variants:
        rows = api.export(run_dir, out=out, all_variants=True, overwrite=overwrite,
                          data_dir=data_dir, progress=progress, mlflow=mlflow,
                          trust_code=trust_code, **flags)
        printers.export_table(rows)
        if any(r["status"] != "ok" for r in rows):
            sys.exit(1)
        return
    res = api.export(run_dir, out=out, overwrite=overwrite, data_dir=data_dir, mlflow=mlflow,
                     trust_code=trust_code, **flags)
    from exporters.run import summary

    printers.export_table([{"name": ExportConfig(**flags).name(), "status": "ok",
                            **summary(res.manifest)}])
    for w in res.manifest["warnings"]:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"wrote {res.path} and {res.manifest_path.name}")
