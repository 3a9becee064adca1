"""Stage 2: exit policies behind one interface (:mod:`eenn.policies.base`), fitted to a budget on
validation predictions. Importing the package registers every policy in ``POLICIES``."""

from eenn.policies import deex, eenet, entropy, margin, maxprob, oracle, patience, static, vote  # noqa: F401
from eenn.policies.base import POLICIES, Decision, ExitPolicy, budget_ceiling, build_policy, policy_class

__all__ = ["POLICIES", "Decision", "ExitPolicy", "budget_ceiling", "build_policy", "policy_class"]
