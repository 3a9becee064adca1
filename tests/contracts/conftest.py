"""The policy tests' synthetic predictions (a 3-exit network) serve the policy contracts too."""

from tests.policies.conftest import one_thread, test_preds, val  # noqa: F401
