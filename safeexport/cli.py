"""The ``safeexport`` command line: each command turns flags into a stage config and calls the
stage's verb. Heavy imports happen inside the commands so ``--help`` stays instant."""

import re
import sys
import time
import traceback
from pathlib import Path

import click

from safeexport.errors import SafeExportError


def _split_list(ctx, param, value):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _default_out(dataset: str, model: str, sparsity: float) -> Path:
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(dataset.split(":", 1)[-1]).name or dataset)
    return Path("runs") / f"{tag}-{model}-s{sparsity:g}-{time.strftime('%Y%m%d-%H%M%S')}"


class Main(click.Group):
    """Turns SafeExportError into one clear line and a non-zero exit (a traceback with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SafeExportError as e:
            if ctx.meta.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; a run can be continued with "
                       "`safeexport compress --out RUN --resume`", err=True)
            sys.exit(130)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"],
                                         "max_content_width": 100})
@click.version_option(package_name="safeexport")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Compress a network for phones without making it leak its training data.

    \b
    safeexport compress   SafeCompress: sparse training with membership-inference-aware selection
    """
    ctx.meta["debug"] = debug


def _help(name: str) -> str:
    from compressor.config import CompressConfig

    return CompressConfig.help_texts()[name]


@main.command()
@click.option("--model", default="auto", show_default=True,
              help="auto, cnn, mlp, alexnet, vgg16, resnet18, bert, roberta "
                   "(auto = cnn for images, mlp for tables, bert for text).")
@click.option("--dataset", default="digits", show_default=True,
              help="digits (embedded, no download), synthetic, fashionmnist, mnist, cifar10, "
                   "cifar100, tinyimagenet, purchase100, texas100, agnews, yelp5, npz:PATH "
                   "(arrays x, y) or folder:PATH (PATH/<class>/<image>).")
@click.option("--data-dir", type=click.Path(file_okay=False), help=_help("data_dir"))
@click.option("--download", is_flag=True, help=_help("download"))
@click.option("--max-samples", type=click.IntRange(min=1), help=_help("max_samples"))
@click.option("--sparsity", type=float, default=0.05, show_default=True,
              help="Fraction of weights KEPT (the paper's Ω): 0.05 keeps 5% of the weights "
                   "and sets 95% to zero. Must be in (0, 1].")
@click.option("--epochs", type=int, default=40, show_default=True, help=_help("epochs"))
@click.option("--update-frequency", type=int, default=40, show_default=True,
              help=_help("update_frequency") + " (paper: 4000).")
@click.option("--batch-size", type=int, default=128, show_default=True, help=_help("batch_size"))
@click.option("--optimizer", default="auto", show_default=True,
              type=click.Choice(["auto", "sgd", "adamw"]), help=_help("optimizer"))
@click.option("--lr", type=float, help=_help("lr"))
@click.option("--momentum", type=float, default=0.9, show_default=True, help=_help("momentum"))
@click.option("--weight-decay", type=float, default=5e-4, show_default=True,
              help=_help("weight_decay"))
@click.option("--regularizer", default="none", show_default=True,
              type=click.Choice(["none", "re1", "re2"]),
              help="Entropy regularizer: re1 rewards output entropy on the whole batch, re2 on "
                   "misclassified samples only (the paper's best).")
@click.option("--beta", type=float, default=0.1, show_default=True, help=_help("beta"))
@click.option("--lam", type=float, default=1.0, show_default=True, help=_help("lam"))
@click.option("--prune", default="magnitude,threshold", show_default=True, callback=_split_list,
              help="Comma-separated prune strategies (candidates = prune x grow).")
@click.option("--grow", default="gradient,random", show_default=True, callback=_split_list,
              help="Comma-separated grow strategies.")
@click.option("--prune-rate", type=float, default=0.5, show_default=True,
              help=_help("prune_rate"))
@click.option("--finetune-iters", type=int, default=20, show_default=True,
              help=_help("finetune_iters"))
@click.option("--attack", default="nasr", show_default=True, help=_help("attack"))
@click.option("--attack-epochs", type=int, default=30, show_default=True,
              help=_help("attack_epochs"))
@click.option("--attack-finetune-epochs", type=int, default=5, show_default=True,
              help=_help("attack_finetune_epochs"))
@click.option("--final-attack-epochs", type=int, default=60, show_default=True,
              help=_help("final_attack_epochs"))
@click.option("--dense-reference/--no-dense-reference", default=True, show_default=True,
              help=_help("dense_reference"))
@click.option("--device", default="auto", show_default=True, help=_help("device"))
@click.option("--seed", type=int, default=0, show_default=True, help=_help("seed"))
@click.option("--pretrained", type=click.Path(file_okay=False), help=_help("pretrained"))
@click.option("--max-length", type=int, default=64, show_default=True, help=_help("max_length"))
@click.option("--vocab-size", type=int, default=8000, show_default=True,
              help=_help("vocab_size"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default runs/<dataset>-<model>-s<sparsity>-<time>).")
@click.option("--resume", is_flag=True,
              help="Continue the killed run in --out from its last checkpoint (its config.json "
                   "decides everything else).")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --out.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars (default: only on a terminal).")
@click.pass_context
def compress(ctx: click.Context, out: Path | None, resume: bool, overwrite: bool,
             progress: bool | None, **flags) -> None:
    """Run SafeCompress: sparse training where every mask update makes candidates (prune x grow),
    a simulated membership-inference attacker tests each, and the best task-accuracy /
    attack-accuracy trade-off (TM-score) survives.

    Writes config.json, splits.npz, model.safetensors, attacker.safetensors, history.jsonl,
    report.json, curve.png and roc.png into the run directory.
    """
    import dataclasses

    from compressor import compress as run_compress
    from compressor.config import CompressConfig

    fields = [f.name for f in dataclasses.fields(CompressConfig)]  # every flag but the run's own
    if resume:
        if out is None:
            raise click.UsageError("--resume needs --out RUN_DIR")
        given = [f"--{k.replace('_', '-')}" for k in fields
                 if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--resume takes the configuration from {out}/config.json; "
                                   f"drop {', '.join(given)}")
        cfg = None
    else:
        cfg = CompressConfig(**{k: flags[k] for k in fields})
    if out is None:
        out = _default_out(cfg.dataset, cfg.model, cfg.sparsity)
    run = run_compress(cfg or CompressConfig(), out, resume=resume, overwrite=overwrite,
                       progress=progress)
    click.echo(f"run directory: {run.path}")


if __name__ == "__main__":
    main()
