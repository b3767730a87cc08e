"""Membership-inference attacks: signals → scores → metrics.

An attack turns a model's outputs (``Signals``) into membership scores; only the code that makes
the signals touches a model. Register a new attack with ``ATTACKS.register(name, cls)``; the
compressor's Branch 2 and device_eval pick it by name.
"""

from safeexport.attacks.base import Attack, Signals
from safeexport.attacks.evaluate import MembershipResult, evaluate_membership
from safeexport.attacks.nasr import NasrAttack
from safeexport.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.register("nasr", NasrAttack)

__all__ = ["ATTACKS", "Attack", "MembershipResult", "NasrAttack", "Signals",
           "evaluate_membership"]
