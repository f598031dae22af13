"""Fixtures of the scale-out tests: the datasets of the training tests."""

from tests.engine.conftest import small_synth_dir  # noqa: F401  (a fixture, used by name)
