"""Fixtures shared by the unit tests."""
import pytest

from _cura_connection.jobs import JobStore


@pytest.fixture
def store(tmp_path):
    """A job store that keeps 3 ended jobs and starts the next job only
    once the plate is cleared."""
    return JobStore(str(tmp_path / "queue.json"), 3, False)
