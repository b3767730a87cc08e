"""The ``safeexport`` command line: each command turns flags into a stage config and calls the
stage's verb. Heavy imports happen inside the commands so ``--help`` stays instant."""

import dataclasses
import sys
import traceback
from pathlib import Path

import click

from commands import api
from compressor.config import CompressConfig
from device_eval.config import EvalConfig
from exporters.config import ExportConfig
from safeexport.errors import SafeExportError
from safeexport.plots import fmt_figure, fmt_interval

# Option help comes from the stage configs' field docs (the configs are torch-free).
COMPRESS_HELP = CompressConfig.help_texts()
EXPORT_HELP = ExportConfig.help_texts()
EVAL_HELP = EvalConfig.help_texts()


def _split_list(ctx, param, value):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _usage_error(e: click.ClickException) -> None:
    """click's own refusals (a bad choice, a missing argument, an unknown option) as one
    ``error:`` line like every other refusal, instead of click's three-line usage block
    (a bare ``safeexport`` still shows the help)."""
    if isinstance(e, click.exceptions.NoArgsIsHelpError):
        e.show()
        sys.exit(e.exit_code)
    where = f"`{e.ctx.command_path} --help`" if getattr(e, "ctx", None) else "`safeexport --help`"
    click.echo(f"error: {e.format_message()} (see {where})", err=True)
    sys.exit(e.exit_code)


class Main(click.Group):
    """Turns SafeExportError (and a file system's OSError) and click's usage errors into one
    clear line and exit status 2 (a traceback with --debug)."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:  # the top level's own options
            _usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a command's options, parsed inside this call
            _usage_error(e)
        except (SafeExportError, OSError) as e:  # an OSError is the file system's "no"
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
    safeexport run        replay a run's recorded config (or a YAML of the same keys)
    safeexport export     quantize the run's model and convert it to ONNX or TFLite, checked
    safeexport evaluate   re-run task test and membership attacks on the exported file: verdict
    safeexport study      pruning/quantization privacy study, or methods compared (--compare)
    safeexport report     one self-contained HTML page of a run for a reviewer
    """
    ctx.meta["debug"] = debug


def _field_option(name: str):
    """``--name`` for a scalar CompressConfig field: its type, default and help come from the
    config, so the command line and the config cannot disagree."""
    field = next(f for f in dataclasses.fields(CompressConfig) if f.name == name)
    return click.option(f"--{name.replace('_', '-')}", type=type(field.default),
                        default=field.default, show_default=True, help=COMPRESS_HELP[name])


# the attacks' registry names (safeexport.attacks.ATTACKS; listed here so that --help does
# not import torch)
ATTACK_NAMES = ["nasr", "class-relative", "loss", "confidence", "entropy", "modified_entropy"]

# The options that decide how a model is trained, shared by `compress` and `study`.
TRAINING_OPTIONS = [
    click.option("--model", default="auto", show_default=True, help=COMPRESS_HELP["model"]),
    click.option("--init-weights", type=click.Path(dir_okay=False),
                 help=COMPRESS_HELP["init_weights"]),
    click.option("--dataset", default="digits", show_default=True,
                 help="digits (embedded, no download), synthetic, fashionmnist, mnist, cifar10, "
                      "cifar100, tinyimagenet, purchase100, texas100, agnews, yelp5, npz:PATH "
                      "(arrays x, y), folder:PATH (PATH/<class>/<image>) or "
                      "torch:package.module:factory (factory() returns a map-style torch "
                      "Dataset of (x, y) pairs)."),
    click.option("--data-dir", type=click.Path(file_okay=False), help=COMPRESS_HELP["data_dir"]),
    click.option("--download", is_flag=True, help=COMPRESS_HELP["download"]),
    click.option("--max-samples", type=click.IntRange(min=1), help=COMPRESS_HELP["max_samples"]),
    click.option("--sparsity", type=float, default=0.05, show_default=True,
                 help="Fraction of weights KEPT (the paper's Ω): 0.05 keeps 5% of the weights "
                      "and sets 95% to zero. Must be in (0, 1]."),
    _field_option("epochs"),
    click.option("--update-frequency", type=int, default=40, show_default=True,
                 help=COMPRESS_HELP["update_frequency"] + " (paper: 4000)."),
    _field_option("batch_size"),
    click.option("--optimizer", default="auto", show_default=True,
                 type=click.Choice(["auto", "sgd", "adamw"]), help=COMPRESS_HELP["optimizer"]),
    click.option("--lr", type=float, help=COMPRESS_HELP["lr"]),
    click.option("--augment", default="auto", show_default=True,
                 type=click.Choice(["auto", "crop-flip", "none"]), help=COMPRESS_HELP["augment"]),
    click.option("--threads", type=click.IntRange(min=1), help=COMPRESS_HELP["threads"]),
    click.option("--lr-schedule", default="cosine", show_default=True,
                 type=click.Choice(["cosine", "multistep"]), help=COMPRESS_HELP["lr_schedule"]),
    _field_option("momentum"),
    _field_option("weight_decay"),
    click.option("--regularizer", default="none", show_default=True,
                 type=click.Choice(["none", "re1", "re2"]),
                 help="Entropy regularizer: re1 rewards output entropy on the whole batch, re2 on "
                      "misclassified samples only (the paper's best)."),
    _field_option("beta"),
    _field_option("lam"),
    click.option("--prune", default="magnitude,threshold", show_default=True, callback=_split_list,
                 help="Comma-separated prune strategies (candidates = prune x grow)."),
    click.option("--grow", default="gradient,random", show_default=True, callback=_split_list,
                 help="Comma-separated grow strategies."),
    _field_option("prune_rate"),
    _field_option("finetune_iters"),
    _field_option("retrain_epochs"),
    click.option("--attack", default="nasr", show_default=True, type=click.Choice(ATTACK_NAMES),
                 help=COMPRESS_HELP["attack"]),
    click.option("--score", default="loss", show_default=True,
                 type=click.Choice([*ATTACK_NAMES, "lira"]),
                 help=COMPRESS_HELP["score"]),
    _field_option("attack_epochs"),
    _field_option("attack_finetune_epochs"),
    _field_option("final_attack_epochs"),
    _field_option("attack_seeds"),
    _field_option("references"),
    click.option("--reference-method", default="same", show_default=True,
                 type=click.Choice(["same", "dense"]), help=COMPRESS_HELP["reference_method"]),
    click.option("--executor", default="local", show_default=True,
                 type=click.Choice(["local", "ray"]), help=COMPRESS_HELP["executor"]),
    click.option("--ray-address", metavar="ADDR", help=COMPRESS_HELP["ray_address"]),
    _field_option("cpus_per_run"),
    _field_option("gpus_per_run"),
    click.option("--select", default="tm", show_default=True, type=click.Choice(["tm", "random"]),
                 help=COMPRESS_HELP["select"]),
    click.option("--allow-no-updates", is_flag=True, help=COMPRESS_HELP["allow_no_updates"]),
    click.option("--dense-reference/--no-dense-reference", default=True, show_default=True,
                 help=COMPRESS_HELP["dense_reference"]),
    click.option("--device", default="auto", show_default=True, help=COMPRESS_HELP["device"]),
    _field_option("seed"),
    click.option("--data-seed", type=click.IntRange(min=0), help=COMPRESS_HELP["data_seed"]),
    click.option("--pretrained", type=click.Path(file_okay=False),
                 help=COMPRESS_HELP["pretrained"]),
    _field_option("max_length"),
    _field_option("vocab_size"),
    _field_option("dp_epsilon"),
    _field_option("dp_delta"),
    _field_option("dp_max_grad_norm"),
    _field_option("advreg_alpha"),
    _field_option("advreg_attack_steps"),
    _field_option("kd_temperature"),
    _field_option("kd_alpha"),
    _field_option("dmp_keep"),
    _field_option("admm_rho"),
]


MLFLOW = click.option("--mlflow", metavar="URI",
                      help="Also log parameters, figures and files to this MLflow tracking "
                           "URI (needs the mlflow extra: pip install 'safeexport[mlflow]').")


TRUST = click.option("--trust-code", is_flag=True,
                     help="Import the model/Dataset factories (package.module:name) that the "
                          "run or config file names; importing runs their code, so only for "
                          "files you trust (e.g. runs you made).")


def training_options(command):
    """Apply every option of TRAINING_OPTIONS to ``command``."""
    for option in reversed(TRAINING_OPTIONS):
        command = option(command)
    return command


@main.command()
@click.option("--method", default="safecompress", show_default=True,
              help=COMPRESS_HELP["method"] + ".")
@training_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default runs/<dataset>-<model>-s<sparsity>-<time>).")
@click.option("--resume", is_flag=True,
              help="Continue the killed run in --out from its last checkpoint (its config.json "
                   "decides everything else).")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --out.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars (default: only on a terminal).")
@MLFLOW
@TRUST
@click.pass_context
def compress(ctx: click.Context, out: Path | None, resume: bool, overwrite: bool,
             progress: bool | None, mlflow: str | None, trust_code: bool, **flags) -> None:
    """Run SafeCompress: sparse training where every mask update makes candidates (prune x grow),
    a simulated membership-inference attacker tests each, and the best task-accuracy /
    attack-accuracy trade-off (TM-score) survives. --method NAME trains one of the baselines
    (see --method) into the same kind of run directory instead.

    Writes config.json, splits.npz, model.safetensors, attacker.safetensors, history.jsonl,
    report.json, curve.png and roc.png into the run directory.
    """
    fields = [f.name for f in dataclasses.fields(CompressConfig)]  # every flag but the run's own
    if resume:
        if out is None:
            raise click.UsageError("--resume needs --out RUN_DIR")
        given = [f"--{k.replace('_', '-')}" for k in fields
                 if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--resume takes the configuration from {out}/config.json; "
                                   f"drop {', '.join(given)}")
        run = api.compress(out, resume=True, progress=progress, mlflow=mlflow,
                           trust_code=trust_code)
    else:
        run = api.compress(out, overwrite=overwrite, progress=progress, mlflow=mlflow,
                           **{k: flags[k] for k in fields})
    click.echo(f"run directory: {run.path}")


@main.command("run")
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default runs/<dataset>-<model>-s<sparsity>-<time>).")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --out.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars (default: only on a terminal).")
@MLFLOW
@TRUST
def run_cmd(config_file: Path, out: Path | None, overwrite: bool,
            progress: bool | None, mlflow: str | None, trust_code: bool) -> None:
    """Replay a run: compress again with the config a run recorded (RUN/config.json) or a
    hand-written YAML/JSON file of the same keys (see config.json's "config" entry; keys left
    out take the defaults of `safeexport compress`), into a new run directory. The file is
    validated with the same messages as the command line."""
    run = api.replay(config_file, out, overwrite=overwrite, progress=progress, mlflow=mlflow,
                     trust_code=trust_code)
    click.echo(f"run directory: {run.path}")


@main.command("study")
@training_options
@click.option("--compare", "methods", callback=_split_list,
              help="Comma-separated methods to compare at --sparsity instead of the "
                   "pruning/quantization study, e.g. dense,prune,pr-advreg,pr-dp,kd,safecompress; "
                   "a method may change settings of its own row with /KEY=VALUE, e.g. "
                   "safecompress/select=random or safecompress/regularizer=re2.")
@click.option("--bits", default="8,4,3,2", show_default=True, callback=_split_list,
              help="Bit widths of the quantized rows of the study.")
@click.option("--format", "fmt", default="tflite", show_default=True,
              type=click.Choice(["onnx", "tflite"]),
              help="Format the quantized rows are exported to and run in.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat every row with this many seeds (from --seed) and report mean ± std.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of the study: one run directory per row and seed, and "
                   "study.md/.csv/.png (or compare.md/.csv/.png). Running the same command "
                   "again reuses the finished runs.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars (default: only on a terminal).")
def study_cmd(methods: list[str] | None, bits: list[str], fmt: str, seeds: int, out: Path,
              progress: bool | None, **flags) -> None:
    """Measure what compression does to membership-inference risk, from one dense model.

    Without --compare: original → pruned (no retraining) → retrained → quantized to each of
    --bits, with train and test accuracy, MIA accuracy, AUC and TPR at 1% FPR per row; the
    quantized rows are measured on the exported files in their runtime.

    With --compare METHODS: each method at --sparsity on the same split and seeds (the
    paper's table: task accuracy, MIA accuracy, TM-score, AUC, TPR, wall time).
    """
    try:
        widths = [int(b) for b in bits]
    except ValueError as e:
        raise click.BadParameter(f"--bits takes integers, got {','.join(bits)}") from e
    res = api.study(out, compare=methods, bits=widths, format=fmt, seeds=seeds,
                    progress=progress, **flags)
    click.echo(res.markdown)
    click.echo("wrote " + ", ".join(str(p) for p in res.files))


@main.command("export")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory from `safeexport compress` (default: the newest finished run "
                   "under runs/).")
@click.option("--format", "fmt", default="onnx", show_default=True,
              type=click.Choice(["onnx", "tflite"]), help=EXPORT_HELP["format"])
@click.option("--bits", type=click.Choice(["32", "16", "8", "4", "3", "2"]), default="8",
              show_default=True, help=EXPORT_HELP["bits"])
@click.option("--scheme", default="weight-only", show_default=True,
              type=click.Choice(["weight-only", "dynamic", "static"]),
              help=EXPORT_HELP["scheme"])
@click.option("--calibration", type=int, default=256, show_default=True,
              help=EXPORT_HELP["calibration"])
@click.option("--keep-float", callback=_split_list, default="",
              help="Comma-separated modules kept in float (e.g. features.0,classifier.2).")
@click.option("--parity-samples", type=int, default=512, show_default=True,
              help=EXPORT_HELP["parity_samples"])
@click.option("--min-agreement", type=float, default=0.9, show_default=True,
              help=EXPORT_HELP["min_agreement"])
@click.option("--warn-only", is_flag=True, help=EXPORT_HELP["warn_only"])
@click.option("--float-tolerance", type=float, default=1e-3, show_default=True,
              help=EXPORT_HELP["float_tolerance"])
@click.option("--batch-size", type=int, default=1, show_default=True,
              help=EXPORT_HELP["batch_size"])
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the run's dataset is now (default: the folder the run recorded).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default RUN/exports/model-<format>-w<bits>-<scheme>.<suffix>); "
                   "its manifest is written beside it as .json.")
@click.option("--all", "all_variants", is_flag=True,
              help="Export every format x bit width (weight-only) and print one table.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar for --all (default: only on a terminal).")
@MLFLOW
@TRUST
def export_cmd(run_dir: Path | None, fmt: str, bits: str, out: Path | None, all_variants: bool,
               overwrite: bool, data_dir: Path | None, progress: bool | None,
               mlflow: str | None, trust_code: bool, **flags) -> None:
    """Quantize the run's model and convert it to ONNX or TFLite for phones.

    Every file is run in its own runtime (onnxruntime, LiteRT) on the run's test split and
    compared with the PyTorch model, then read back to verify the stored bit widths and that
    pruned weights are still zero; the figures go into a manifest beside the file.
    """
    if all_variants:
        if out is not None:
            raise click.UsageError("--all writes into RUN/exports/; drop --out")
        rows = api.export(run_dir, all_variants=True, overwrite=overwrite, data_dir=data_dir,
                          progress=progress, mlflow=mlflow, trust_code=trust_code,
                          format=fmt, bits=int(bits), **flags)
        _print_export_table(rows)
        if any(r["status"] != "ok" for r in rows):
            sys.exit(1)
        return
    res = api.export(run_dir, out=out, overwrite=overwrite, data_dir=data_dir, mlflow=mlflow,
                     trust_code=trust_code, format=fmt, bits=int(bits), **flags)
    from exporters.run import summary

    name = ExportConfig(format=fmt, bits=int(bits), **flags).name()
    _print_export_table([{"name": name, "status": "ok", **summary(res.manifest)}])
    for w in res.manifest["warnings"]:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"wrote {res.path} and {res.manifest_path.name}")


def _print_export_table(rows: list[dict]) -> None:
    click.echo(f"{'export':32}{'bytes':>10}{'gzip':>10}{'floor':>10}{'acc':>7}{'->':>7}"
               f"{'agree':>7}{'SNR dB':>8}")
    for r in rows:
        if r["status"] != "ok":
            click.echo(f"{r['name']:32}FAILED: {r['reason']}")
            continue
        snr = "exact" if r["snr_db"] is None else f"{r['snr_db']:.1f}"
        click.echo(f"{r['name']:32}{r['bytes']:10,}{r['gzip_bytes']:10,}{r['floor_bytes']:10,}"
                   f"{r['acc_before']:7.3f}{r['acc_after']:7.3f}{r['agreement']:7.3f}{snr:>8}")



@main.command("evaluate")
@click.argument("model_files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default: the run recorded in the file's manifest).")
@click.option("--runtime", default="auto", show_default=True,
              type=click.Choice(["auto", "torch", "onnxruntime", "tflite", "adb"]),
              help=EVAL_HELP["runtime"])
@click.option("--serial", help=EVAL_HELP["serial"])
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the JSON report (default RUN/evals/<file>-<runtime>.json; "
                   "the ROC plot goes beside it as .png).")
@click.option("--max-mia-rise", type=float, default=0.01, show_default=True,
              help=EVAL_HELP["max_mia_rise"])
@click.option("--max-task-drop", type=float, default=0.02, show_default=True,
              help=EVAL_HELP["max_task_drop"])
@click.option("--inconclusive-ok", is_flag=True,
              help="Exit 0 on an INCONCLUSIVE verdict (a warning instead of exit status 3).")
@click.option("--threads", type=int, help=EVAL_HELP["threads"])
@click.option("--attack-epochs", type=int, help=EVAL_HELP["attack_epochs"])
@click.option("--attack-seeds", type=int, help=EVAL_HELP["attack_seeds"])
@click.option("--references", type=int, help=EVAL_HELP["references"])
@click.option("--references-export", is_flag=True, help=EVAL_HELP["references_export"])
@click.option("--adb", default="adb", show_default=True, help=EVAL_HELP["adb"])
@click.option("--runner", default="benchmark_model", show_default=True,
              type=click.Choice(["benchmark_model", "python"]), help=EVAL_HELP["runner"])
@click.option("--runner-path", help=EVAL_HELP["runner_path"])
@click.option("--runner-binary", type=click.Path(dir_okay=False),
              help=EVAL_HELP["runner_binary"])
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help=EVAL_HELP["timeout"])
@click.option("--chunk", type=int, default=256, show_default=True, help=EVAL_HELP["chunk"])
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the run's dataset is now (default: the folder the run recorded).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing --json report (and the .png beside it).")
@click.option("--members", type=click.Path(dir_okay=False, path_type=Path),
              help="Audit a file safeexport did not make: npz (x, y) of samples the model "
                   "trained on, or with a 'member' array (1/0) marking members among all.")
@click.option("--nonmembers", type=click.Path(dir_okay=False, path_type=Path),
              help="With --members: npz (x, y) of samples the model did not train on.")
@click.option("--test", type=click.Path(dir_okay=False, path_type=Path),
              help="With --members: npz (x, y) for task accuracy (default: the non-members).")
@click.option("--model", metavar="ARCH",
              help="With --members --references K: the file's architecture (cnn, mlp, ... or "
                   "package.module:factory), to train reference models like it for LiRA and "
                   "RMIA (K per half of the data, 2K in all).")
@click.option("--train-config", type=click.Path(dir_okay=False, path_type=Path),
              help="With --model: how the file's model was trained, a YAML/JSON of `safeexport "
                   "compress` keys (method, epochs, lr, ...; default a dense model with "
                   "compress's defaults); the data keys are the audit's own.")
@MLFLOW
@TRUST
def evaluate_cmd(model_files: tuple[Path, ...], run_dir: Path | None, json_out: Path | None,
                 data_dir: Path | None, overwrite: bool, members: Path | None,
                 nonmembers: Path | None, test: Path | None, model: str | None,
                 train_config: Path | None, mlflow: str | None,
                 trust_code: bool, inconclusive_ok: bool, **flags) -> None:
    """Re-run the task test and the membership-inference attacks on MODEL_FILE (an export from
    `safeexport export`, or a run's model.safetensors) in the runtime a phone uses, beside the
    same figures for the run's PyTorch model, and say whether safety survived. LiRA and RMIA
    run too when the run has reference models (--references).

    With several files (variants of one run's model, e.g. its float and int8 exports): each is
    evaluated, then an attacker holding all of them attacks jointly; the joint report (--json,
    default RUN/evals/joint-<files>.json) says whether that beats the strongest single file.

    With --members (and --nonmembers, or a 'member' array in the members npz): an audit of a
    .onnx/.tflite file safeexport did not make, on your data: task accuracy and every attack
    that needs no reference models, with intervals (no verdict: there is no model to compare
    with); with --model ARCH --references K also LiRA and RMIA, from K reference models
    per half trained like it (--train-config): K on halves of the members and non-members the
    attacks do not measure, then K on the measured half to score the other (cross-fitting,
    2K in all), so that the exposure ranking by LiRA covers every member. The file must take
    inputs as safeexport feeds them: images N x C x H x W scaled to [0, 1], tables N x D
    float32.

    The verdict puts the burden of proof on safety. Every attack (threshold attacks, the
    trained attacker fitted once on the PyTorch model, LiRA/RMIA with references) is compared
    on folded MIA accuracy, folded AUC and TPR at 1% FPR with one paired bootstrap over all of
    them. PASS: the 95% upper bound of the largest rise is below --max-mia-rise on every
    figure, and task accuracy fell by at most --max-task-drop. FAIL: some rise is above the
    tolerance with a lower bound above zero, or accuracy fell by more. INCONCLUSIVE: neither
    is shown on this many samples; the report says about how many would decide it.

    Exit status: 0 PASS, 1 FAIL, 3 INCONCLUSIVE (0 with --inconclusive-ok, after a warning),
    2 for an error.
    """
    res = api.evaluate(*model_files, run=run_dir, json_out=json_out, data_dir=data_dir,
                       overwrite=overwrite, members=members, nonmembers=nonmembers, test=test,
                       mlflow=mlflow, trust_code=trust_code, model=model,
                       train_config=train_config, **flags)
    if members is not None:
        _print_audit(res)
        return
    if len(model_files) == 1:
        _print_evaluation(model_files[0], res)
    else:
        for f, one in zip(model_files, res.reports, strict=True):
            _print_evaluation(f, one)
            click.echo("")
        _print_joint(res)
    if res.outcome == "FAIL":
        sys.exit(1)
    if res.outcome == "INCONCLUSIVE":
        if not inconclusive_ok:
            sys.exit(3)
        click.echo("warning: the verdict is INCONCLUSIVE; --inconclusive-ok lets it pass",
                   err=True)


def _print_joint(res) -> None:
    j = res.joint
    click.echo(f"joint attack on {len(j['files'])} variants (an attacker holding every file):")
    for label, key in (("joint", "strongest_joint"), ("single", "strongest_single")):
        m = j[key]
        where = (f" on {Path(j['files'][m['variant']]).name}" if key == "strongest_single"
                 else "")
        click.echo(f"  strongest {label:7}{m['attack']:>17}{where}: MIA acc "
                   f"{fmt_interval(m, 'mia_acc')}, AUC {m['auc']:.3f}, TPR@1% "
                   f"{fmt_figure(m['tpr_at_1pct_fpr'], '.3f')}")
    d = j["difference"]["mia_acc"]
    ci = ("no interval (identical scores)" if d["ci"] is None else
          f"paired 95% interval {100 * d['ci'][0]:+.2f} to {100 * d['ci'][1]:+.2f}")
    verdict = ("the joint attack is stronger" if j["joint_exceeds_single"] else
               "no gain of the joint attack beyond the noise")
    click.echo(f"  joint − single MIA accuracy {100 * d['delta']:+.2f} points ({ci}): {verdict}")
    click.echo(f"joint report {res.json_path}")


def _print_evaluation(model_file: Path, res) -> None:
    r = res.report
    click.echo(f"{model_file.name} on {r['runtime']['name']} ({r['runtime']['version']}), "
               f"{r['samples']['eval_members']}+{r['samples']['eval_nonmembers']} unknown "
               f"members/non-members, {r['samples']['test']} test samples")
    v = r["verdict"]
    click.echo(f"{'':10}{'task acc':>9}{'MIA acc (95% CI)':>24}{'AUC':>7}{'TPR@1%':>8}"
               f"{'TPR@.1%':>8}{'TM':>7}  ({r['attack']['name']} attack)")
    for label, key in (("PyTorch", "before"), ("exported", "after")):
        m = r[key]
        click.echo(f"{label:10}{m['task_acc']:9.4f}{fmt_interval(m, 'mia_acc'):>24}"
                   f"{m['auc']:7.3f}{fmt_figure(m['tpr_at_1pct_fpr'], '8.3f')}"
                   f"{fmt_figure(m['tpr_at_0.1pct_fpr'], '8.3f')}{m['tm_score']:7.3f}")
    refs = r["after"].get("reference_attacks")
    if refs:
        st = refs["settings"]
        click.echo(f"reference attacks ({st['references']} {st['method']} reference models, "
                   f"{st['models']}; PyTorch -> exported):")
        for name in ("lira", "rmia"):
            b, a = r["before"]["reference_attacks"][name], refs[name]
            click.echo(f"  {name.upper():6} AUC {b['auc']:.3f} -> {a['auc']:.3f}   TPR@1% "
                       f"{fmt_figure(b['tpr_at_1pct_fpr'], '.3f')} -> "
                       f"{fmt_figure(a['tpr_at_1pct_fpr'], '.3f')}   TPR@0.1% "
                       f"{fmt_figure(b['tpr_at_0.1pct_fpr'], '.3f')} -> "
                       f"{fmt_figure(a['tpr_at_0.1pct_fpr'], '.3f')}")
    click.echo(f"largest rise over {len(v['attacks'])} attacks (paired 95% interval, "
               f"tolerance {100 * v['max_mia_rise']:g} points):")
    for fig, d in v["rises"]["max"].items():
        if d["delta"] is None:
            continue
        ci = (f"{100 * d['ci'][0]:+.2f} to {100 * d['ci'][1]:+.2f}" if d["ci"]
              else "no interval")
        click.echo(f"  {fig:16}{100 * d['delta']:+7.2f} points ({ci}), {d['attack']}")
    click.echo(f"top-1 agreement {r['parity']['agreement']:.4f}; task accuracy change "
               f"{-100 * v['task_drop']:+.2f} points; report {res.json_path}, "
               f"ROC {res.plot_path.name}")
    for w in r["warnings"]:
        click.echo(f"warning: {w}")
    for why in v.get("not_decidable", []):  # reports from before the rule have none
        click.echo(f"left out of the verdict: {why}")
    if v["outcome"] == "PASS":
        click.echo("PASS: no attack's rise reaches the tolerance (95% upper bounds below it), "
                   "and accuracy kept")
    elif v["outcome"] == "FAIL":
        click.echo("FAIL: " + "; ".join(v["reasons"]))
    else:
        beyond = (", more samples than the dataset has" if v.get("samples_needed_exceed_data")
                  else "")
        more = (f"about {v['samples_needed']} evaluated samples (now {v['evaluated']}{beyond}) "
                "would decide it if the rise stays where it is" if v["samples_needed"] else
                "a point rise is above the tolerance without being proven: more samples would "
                "decide whether it is real")
        click.echo("INCONCLUSIVE: " + "; ".join(v["undecided"]) + f"; {more}")


def _print_audit(res) -> None:
    r, f = res.report, res.report["figures"]
    s = r["samples"]
    click.echo(f"audit of {Path(r['model_file']).name} on {r['runtime']['name']} "
               f"({r['runtime']['version']}): {s['eval_members']}+{s['eval_nonmembers']} "
               f"members/non-members measured, attacker trained on {s['known_members']}+"
               f"{s['known_nonmembers']}")
    lo, hi = f["task_acc_ci"]
    click.echo(f"task accuracy {f['task_acc']:.4f} [{lo:.4f}, {hi:.4f}] on {r['task_acc_on']}")
    click.echo(f"{'attack':18}{'MIA acc (95% CI)':>26}{'AUC':>7}{'TPR@1%':>8}")
    refs = r["reference_attacks"]
    rows = [(f["attack"], f), *f["threshold_attacks"].items(),
            *(((name, refs[name]) for name in ("lira", "rmia")) if isinstance(refs, dict)
              else ())]
    for name, m in rows:
        click.echo(f"{name:18}{fmt_interval(m, 'mia_acc'):>26}{m['auc']:7.3f}"
                   f"{fmt_figure(m['tpr_at_1pct_fpr'], '8.3f')}")
    if isinstance(refs, dict):
        st = refs["settings"]
        click.echo(f"  (LiRA, RMIA: {st['references']} {st['method']} reference models per "
                   f"half, cross-fitted: {r['references']['folder']} and "
                   f"{Path(r['references']['swapped_folder']).name}; every member ranked)")
    else:
        click.echo(f"reference attacks {refs}")
    click.echo(f"strongest: {f['strongest']['attack']}")
    top = r["exposure"]["records"][:5]
    if top:
        click.echo(f"most exposed members ({r['exposure']['attack']}; row of the members "
                   f"file: FPR at which it is flagged): "
                   + ", ".join(f"{e['index']}: {e['flagged_fpr']:.3f}" for e in top))
    for w in r["warnings"]:
        click.echo(f"warning: {w}")
    from device_eval.run import exposure_path

    click.echo(f"report {res.json_path}, ROC {res.plot_path.name}, exposure "
               f"{exposure_path(res.json_path).name}")


@main.command("report")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page (default RUN/report.html).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the run's dataset is now (default: the folder the run recorded).")
@TRUST
def report_cmd(run_dir: Path | None, out: Path | None, overwrite: bool,
               data_dir: Path | None, trust_code: bool) -> None:
    """One self-contained HTML page of RUN_DIR (default: the newest finished run under runs/)
    to hand to a reviewer: the verdicts on its evaluated exports, every figure with its 95%
    interval, the strongest attack, the ROC from FPR = 1/N, the most exposed records, the
    export table and every recorded hash. Plots are embedded; the page loads nothing."""
    path = api.report(run_dir, out=out, overwrite=overwrite, data_dir=data_dir,
                      trust_code=trust_code)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
