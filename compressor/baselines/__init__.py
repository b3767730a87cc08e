"""The methods SafeCompress is compared with (SPEC §6), each a ``--method`` of
``safeexport compress`` writing the same run directory, so export and evaluate work on all.

A method takes the run's ``Setup`` (data, split, architecture, optimizer, seeds) and returns
the trained model's state, and the dense model when it trained one on the way (the two-step
baselines start from the dense reference, which is then not trained twice).

The two-step baselines are a compression (``pr``: magnitude pruning, ``kd``: a narrow dense
student) followed by a defence (none, ``dp``, ``advreg``, ``dmp``), each one function of
``students`` and ``defences``; ``mia-pr`` is ADMM pruning (``admm``).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from compressor.setup import Setup, train_dense
from compressor.train import TrainState
from safeexport import names
from safeexport.registry import Registry


@dataclass
class Outcome:
    """A method's trained model, the dense model it started from (with its wall time), what
    the report should say about the method, and the model.json of the trained model when it
    is not the run's architecture (a narrow student, DP-SGD's normalisation), and ``steps``:
    the optimizer steps that made the trained model from its initialisation (a pruned model
    inherits the dense model's; a distilled student starts from scratch)."""

    state: TrainState
    dense: tuple[TrainState, float] | None = None
    extra: dict = field(default_factory=dict)
    spec: dict | None = None
    steps: int = 0


METHODS: Registry[Callable[[Setup], Outcome]] = Registry("method")


@METHODS.decorator("dense")
def dense(setup: Setup) -> Outcome:
    """The uncompressed model on the whole budget: the reference row of every table."""
    return Outcome(train_dense(setup)[0], steps=setup.total)


def two_step(compression: str, defence: str) -> Callable[[Setup], Outcome]:
    """Train dense, compress (``pr`` or ``kd``), then train the compressed model with the
    defence."""
    def method(setup: Setup) -> Outcome:
        from compressor.baselines.defences import DEFENCES
        from compressor.baselines.students import narrow_student, pruned_student, student_report

        # a narrow student needs no teacher to be built: a model without a width fails here,
        # before the dense model is trained
        student = narrow_student(setup) if compression == "kd" else None
        teacher, dense_time = train_dense(setup)
        t0 = time.time()
        student = student or pruned_student(setup, teacher.model)
        state, extra = DEFENCES.get(defence)(setup, student, teacher.model)
        spec = student.spec
        norm = extra.get("dp", {}).get("norm")
        if norm:
            spec = {**(spec or {"name": setup.model_name, "kwargs": setup.model_kwargs}),
                    "norm": norm}
        extra["two_step"] = {"compression": compression, "defence": defence,
                             "iters": student.iters, "lr": student.lr,
                             "seconds_after_dense": round(time.time() - t0, 1)}
        if compression == "kd":
            extra["student"] = student_report(setup, student)
        steps = (setup.total if compression == "pr" else 0) + extra.get("dp", {}).get(
            "steps", student.iters)
        return Outcome(state, (teacher, dense_time), extra, spec, steps)

    method.__doc__ = f"{compression} compression, then the {defence} defence."
    return method


# the methods whose defence trains on non-member data (the validation split, defences.py's
# reference_set): an audit must not hand them the non-members it scores
TRAINS_ON_VALIDATION: set[str] = set()
for _name, _compression, _defence in (("prune", "pr", "none"), ("pr-dp", "pr", "dp"),
                                      ("pr-advreg", "pr", "advreg"), ("pr-dmp", "pr", "dmp"),
                                      ("kd", "kd", "none"), ("kd-dp", "kd", "dp"),
                                      ("kd-advreg", "kd", "advreg"), ("kd-dmp", "kd", "dmp")):
    METHODS.register(_name, two_step(_compression, _defence))
    if _defence in ("advreg", "dmp"):
        TRAINS_ON_VALIDATION.add(_name)


@METHODS.decorator("mia-pr")
def mia_pruning(setup: Setup) -> Outcome:
    """Wang et al. (2021)'s pruning against MIA: ADMM weight pruning from the dense model,
    then the sparse model retrained."""
    from compressor.baselines.admm import admm_prune

    teacher, dense_time = train_dense(setup)
    state, extra = admm_prune(setup, teacher.model)
    a = extra["admm"]
    return Outcome(state, (teacher, dense_time), extra,
                   steps=setup.total + a["admm_iters"] + a["retrain_iters"])


METHODS.check(names.BASELINES)
