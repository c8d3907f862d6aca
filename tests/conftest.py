"""Shared fixtures."""

import pytest
from hypothesis import HealthCheck, Phase, settings

from ksfx.config import config


@pytest.fixture
def triton_interpret(monkeypatch):
    """Run the generated Triton kernels on CPU tensors through Triton's interpreter.

    Scoped to one test: ``TRITON_INTERPRET`` is read when a kernel is created, and the
    kernel cache is keyed on the mode, so other tests keep the plain CPU path.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(config, "interpret", True)


# Hypothesis profiles: ``ci`` (default) is fixed and fast; ``--hypothesis-profile=long``
# (hypothesis' own pytest option) explores deeply. Tests scale their budgets from the
# active profile's ``max_examples``.
settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # a failure is reported unshrunk: compiles are slow
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long",
    max_examples=600,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")
