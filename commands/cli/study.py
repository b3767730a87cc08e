"""``safeexport study``: the prune -> retrain -> quantize study, or methods compared."""

from pathlib import Path

import click

from commands import api
from commands.cli.compress import training_options
from commands.cli.options import progress, split_list
from safeexport import names


def _bit_widths(ctx, param, value):
    try:
        return [int(b) for b in split_list(ctx, param, value)]
    except ValueError:
        raise click.BadParameter(f"takes comma-separated integers, got {value}") from None


@click.command("study")
@training_options
@click.option("--compare", "methods", callback=split_list,
              help="Comma-separated methods to compare at --sparsity instead of the "
                   f"pruning/quantization study ({', '.join(names.METHODS)}); a method may "
                   "change settings of its own row with /KEY=VALUE, e.g. "
                   "safecompress/select=random or safecompress/regularizer=re2.")
@click.option("--bits", default=",".join(map(str, names.BITS[2:])), show_default=True,
              callback=_bit_widths, help="Bit widths of the quantized rows of the study.")
@click.option("--format", "fmt", default="tflite", show_default=True,
              type=click.Choice(names.FORMATS),
              help="Format the quantized rows are exported to and run in.")
@click.option("--finetune-epochs", type=int, default=0, show_default=True,
              help="Also export each --bits width after this many epochs of quantization-aware "
                   "fine-tuning on the members (export --finetune-epochs) and measure it as "
                   "its own row.")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="Repeat every row with this many seeds (from --seed) and report mean ± std.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of the study: one run directory per row and seed, and "
                   "study.md/.csv/.png (or compare.md/.csv/.png). Running the same command "
                   "again reuses the finished runs.")
@progress()
def command(methods: list[str] | None, bits: list[int], fmt: str, finetune_epochs: int,
            seeds: int, out: Path, progress: bool | None, **flags) -> None:
    """Measure what compression does to membership-inference risk, from one dense model.

    Without --compare: original → pruned (no retraining) → retrained → quantized to each of
    --bits, with train and test accuracy, MIA accuracy, AUC and TPR at 1% FPR per row; the
    quantized rows are measured on the exported files in their runtime.

    With --compare METHODS: each method at --sparsity on the same split and seeds (the
    paper's table: task accuracy, MIA accuracy, TM-score, AUC, TPR, wall time).
    """
    res = api.study(out, compare=methods, bits=bits, format=fmt, seeds=seeds,
                    finetune_epochs=finetune_epochs, progress=progress, **flags)
    click.echo(res.markdown)
    click.echo("wrote " + ", ".join(str(p) for p in res.files))
