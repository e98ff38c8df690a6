"""The SDK tests' `client`: the official SDK, strictly validating, in place of the package's raw httpx one."""

import pytest

from tests.gateway.sdk_helpers import _client


@pytest.fixture(scope="package")
def client(server):
    with _client(server) as c:
        yield c
