"""safeexport: compress a network for phones without making it leak its training data.

The public API, one function per command (see ``commands.api`` for the parameters)::

    from safeexport import compress, export, evaluate, replay, report, study
"""

from importlib.metadata import version

from safeexport.openmp import set_wait_policy

set_wait_policy()  # before anything loads torch: see safeexport/openmp.py

__version__ = version("safeexport")

API = ("compress", "replay", "export", "evaluate", "study", "report")
__all__ = [*API, "__version__"]


def __getattr__(name: str):
    # The API lives in the command layer above the stages (commands/api.py); it is resolved on
    # first use so that importing the core (safeexport.config, .rundir, ...) never pulls the
    # stages in, and no module of the core imports a stage.
    if name in API:
        from commands import api

        return getattr(api, name)
    raise AttributeError(f"module 'safeexport' has no attribute {name!r}")
