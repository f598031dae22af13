"""Fixtures of the scale-out tests: the datasets of the training tests."""

from tests.engine.conftest import small_synth_dir  # noqa: F401  (a fixture, used by name)
from tests.tune.conftest import tracking_uri  # noqa: F401,E402  (a fixture, used by name)
