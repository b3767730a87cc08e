"""Membership-inference attacks: signals → scores → metrics.

An attack turns a model's outputs (``Signals``) into membership scores; only the code that makes
the signals touches a model. A new attack is a factory called as ``factory(num_classes,
device)``, registered here with ``ATTACKS.register(name, factory)`` and named in
``safeexport.names.ATTACKS`` (the registry refuses to load when the two differ); the
compressor's Branch 2 and device_eval pick it by name. ``nasr`` is the trained attacker,
``class-relative`` the same network reading the log-probabilities in class order (device_eval
fits both to an exported file, as its holder would); the threshold attacks (``loss``,
``confidence``, ``entropy``, ``modified_entropy``) are registered too, as deterministic,
training-free in-loop scores.
"""

from collections.abc import Callable
from functools import partial

from safeexport import names
from safeexport.attacks.base import Attack, AttackResult, Signals, is_member_of
from safeexport.attacks.evaluate import MembershipResult, fit_and_score
from safeexport.attacks.nasr import ClassRelativeAttack, NasrAttack
from safeexport.attacks.threshold import THRESHOLD_ATTACKS, ThresholdAttack
from safeexport.registry import Registry

ATTACKS: Registry[Callable[..., Attack]] = Registry("attack")
ATTACKS.register("nasr", NasrAttack)
ATTACKS.register("class-relative", ClassRelativeAttack)
for _name in THRESHOLD_ATTACKS:
    ATTACKS.register(_name, partial(ThresholdAttack, _name))
ATTACKS.check(names.ATTACKS)

__all__ = ["ATTACKS", "Attack", "AttackResult", "MembershipResult", "NasrAttack", "Signals",
           "ThresholdAttack", "fit_and_score", "is_member_of"]
