"""Fixtures shared by the tests that start real Ray instances."""
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest


def ray_folder() -> dict[str, str]:
    """Environment of one Ray instance: a short scratch folder (Ray's socket paths must be
    short) holding its temp files and an auth token, so no test touches ``~/.ray``."""
    base = tempfile.mkdtemp(prefix="r", dir="/tmp")
    Path(base, "token").write_text(secrets.token_hex(32))
    return {"RAY_TMPDIR": base, "RAY_AUTH_TOKEN_PATH": f"{base}/token", "TMPDIR": base}


@pytest.fixture(scope="module")
def scratch():
    """A short module-wide folder under /tmp, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
