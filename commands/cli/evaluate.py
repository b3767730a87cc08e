"""``safeexport evaluate``: a file against its run (the verdict), several variants jointly, or
a foreign file's audit (--members)."""

import sys
from pathlib import Path

import click

from commands import api
from commands.cli import printers
from commands.cli.options import DATA_DIR, MLFLOW, TRUST, config_options, overwrite
from device_eval.config import EvalConfig


@click.command("evaluate")
@click.argument("model_files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default: the run recorded in the file's manifest).")
@config_options(EvalConfig)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the JSON report (default RUN/evals/<file>-<runtime>.json; "
                   "the ROC plot goes beside it as .png).")
@click.option("--inconclusive-ok", is_flag=True,
              help="Exit 0 on an INCONCLUSIVE verdict (a warning instead of exit status 3).")
@DATA_DIR
@overwrite("an existing --json report (and the .png beside it)")
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
def command(model_files: tuple[Path, ...], run_dir: Path | None, json_out: Path | None,
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
        printers.audit(res)
        return
    if len(model_files) == 1:
        printers.evaluation(model_files[0], res)
    else:
        for f, one in zip(model_files, res.reports, strict=True):
            printers.evaluation(f, one)
            click.echo("")
        printers.joint(res)
    if res.outcome == "FAIL":
        sys.exit(1)
    if res.outcome == "INCONCLUSIVE":
        if not inconclusive_ok:
            sys.exit(3)
        click.echo("warning: the verdict is INCONCLUSIVE; --inconclusive-ok lets it pass",
                   err=True)
