"""Shared test settings: hypothesis is seeded (derandomized) so a failure replays exactly; the
tensorflow-datasets mock."""
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", derandomize=True, deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=15,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def mocked_tfds(monkeypatch):
    """Every tensorflow-datasets name reads as prepared, with 9 random examples per split
    (``tfds.testing.mock_data``); a download attempt fails the test."""
    import tensorflow_datasets as tfds

    # tfds.testing.mock_data fakes the data source but leaves is_prepared() False; qdata checks
    # is_prepared() first, so the test declares the (mocked) data prepared.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, *a, **k: pytest.fail("qdata must never download"))
    with tfds.testing.mock_data(num_examples=9):
        yield
