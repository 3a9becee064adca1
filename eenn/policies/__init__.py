"""Stage 2: exit policies behind one interface (:mod:`eenn.policies.base`), fitted to a budget on
validation predictions. Importing the package imports every module in it, and so registers every
policy in ``POLICIES``: a new policy is its module (and its YAML in conf/policy)."""

from eenn.policies.base import POLICIES, Decision, ExitPolicy, budget_ceiling, build_policy, policy_class
from eenn.registry import import_submodules

# eenet_scheduler holds no policy of its own: it comes in when an EENet policy trains or loads
import_submodules(__name__, skip={"eenet_scheduler"})

__all__ = ["POLICIES", "Decision", "ExitPolicy", "budget_ceiling", "build_policy", "policy_class"]
