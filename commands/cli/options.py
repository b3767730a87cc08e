"""Options shared by several commands, each declared once, and the options generated from a
stage config's fields: flag name, type, default, choices and help all come from the config
(and its choices from safeexport.names), so the command line and the config cannot disagree.
The configs are torch-free, so ``--help`` stays instant."""

import dataclasses
import types
import typing
from pathlib import Path

import click

from safeexport.config import StageConfig


def split_list(ctx, param, value):
    """A comma-separated option as a list (None when not given)."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _to_int(ctx, param, value):
    return None if value is None else int(value)


def flag_name(field: str) -> str:
    """``--field-name`` of a config field."""
    return f"--{field.replace('_', '-')}"


def _scalar_type(field: dataclasses.Field) -> type:
    """int, float, str, bool or list: the field's type without ``| None``."""
    hint = field.type
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def config_option(cls: type[StageConfig], name: str, *decls: str, **override):
    """The option of ``cls``'s field ``name``: ``--name`` (or ``decls``), its default shown,
    its choices as a ``click.Choice``, a bool as a flag (``--x/--no-x`` when on by default), a
    list as comma-separated names; ``override`` replaces any of click's keywords."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = (field.default_factory() if field.default is dataclasses.MISSING
               else field.default)
    kind = _scalar_type(field)
    choices = field.metadata.get("choices")
    kw: dict = {"help": field.metadata["help"], "show_default": default not in (None, False)}
    flag = flag_name(name)
    if kind is bool:
        decls = decls or ((f"{flag}/--no-{flag[2:]}",) if default else (flag,))
        kw.update(default=default, **({} if default else {"is_flag": True}))
    elif kind is list:
        kw.update(default=",".join(default), callback=split_list)
        kw["help"] += " (comma-separated" + (f": {', '.join(choices)})" if choices else ")")
    elif choices is not None:
        kw.update(type=click.Choice([str(c) for c in choices]),
                  default=None if default is None else str(default))
        if kind is int:
            kw["callback"] = _to_int
    else:
        kw.update(type=kind, default=default)
    kw.update(override)
    return click.option(*(decls or (flag,)), name, **kw)


def config_options(cls: type[StageConfig], skip: tuple[str, ...] = ()):
    """Every field of ``cls`` but ``skip`` as its ``config_option``, in the config's order."""
    def apply(command):
        for field in reversed(dataclasses.fields(cls)):
            if field.name not in skip:
                command = config_option(cls, field.name)(command)
        return command
    return apply


def overwrite(what: str):
    """``--overwrite``: replace ``what``."""
    return click.option("--overwrite", is_flag=True, help=f"Replace {what}.")


def progress(what: str = "Progress bars"):
    """``--progress/--no-progress``, on a terminal by default."""
    return click.option("--progress/--no-progress", default=None,
                        help=f"{what} (default: only on a terminal).")


RUN_OUT = click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                       help="Run directory (default runs/<dataset>-<model>-s<sparsity>-<time>).")

DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        help="Where the run's dataset is now (default: the folder the run "
                             "recorded).")

RUN_DIR = click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path),
                       help="Run directory from `safeexport compress` (default: the newest "
                            "finished run under runs/).")

MLFLOW = click.option("--mlflow", metavar="URI",
                      help="Also log parameters, figures and files to this MLflow tracking "
                           "URI (needs the mlflow extra: pip install 'safeexport[mlflow]').")

TRUST = click.option("--trust-code", is_flag=True,
                     help="Import the model/Dataset factories (package.module:name) that the "
                          "run or config file names; importing runs their code, so only for "
                          "files you trust (e.g. runs you made).")
