"""The ``safeexport`` group: one ``error:`` line and exit status 2 for every refusal."""

import sys
import traceback

import click

from safeexport.errors import SafeExportError


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
