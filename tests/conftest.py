"""Shared fixtures."""

import pytest

from ksfx.config import config


@pytest.fixture
def triton_interpret(monkeypatch):
    """Run the generated Triton kernels on CPU tensors through Triton's interpreter.

    Scoped to one test: ``TRITON_INTERPRET`` is read when a kernel is created, and the
    kernel cache is keyed on the mode, so other tests keep the plain CPU path.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(config, "interpret", True)
