"""Shared test settings: hypothesis is seeded (derandomized) so a failure replays exactly; JAX's
persistent compilation cache in a directory of this session's own; the tensorflow-datasets mock."""
import atexit
import os
import shutil
import tempfile

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

# Many tests (and the runs they start in subprocesses, which inherit the environment) compile the
# same programs: a resumed run recompiles what the killed run compiled. JAX's persistent cache, set
# before JAX is imported, keeps each compiled program for the rest of the session (measured on
# tests/test_resume.py: 65 s of CPU without it, 34 s with it). It starts empty, so no test sees a
# program compiled by an earlier session or by other code.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="qdata-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


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
