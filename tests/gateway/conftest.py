"""The gateway package's servers, each started once and shared by every test file here (a start is ~10 s of
CPU-bound imports); they start side by side on first use:
- `server`: the default one, max_model_len 256 (block_size 16, prefix caching on: the engine's defaults);
- `auth_server`: --api-key secret, --cors-origin;
- `limited`: --max-concurrent-requests 2, 1 s header and body timeouts, a 10 kB body limit and request limits
  (n, stop, logprobs) from a TOML preset, max_model_len 1024 (long streams), and its API key from the
  environment (KVGATE_API_KEY).

After the last test, before they stop, `servers` checks that nothing made a server error (no 5xx counted, no
"Traceback" or "ERROR" logged): a failure there shows as an error of the last test to use them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.gateway.http_helpers import API_KEY, ENV_KEY, LIMITS_TOML, MAX_LEN, ORIGIN, scrape
from tests.server import running_server


@pytest.fixture(scope="package")
def servers(tiny_llama_dir, tmp_path_factory):
    toml = tmp_path_factory.mktemp("gateway_http") / "limits.toml"
    toml.write_text(LIMITS_TOML)
    model = ["--max-model-len", str(MAX_LEN)]
    specs = {
        "default": (model, None),
        "auth": (model + ["--api-key", API_KEY, "--cors-origin", ORIGIN], None),
        "limited": (["--max-model-len", "1024", "--max-concurrent-requests", "2", "--config", str(toml)],
                    {"KVGATE_API_KEY": ENV_KEY}),
    }
    contexts = {name: running_server(tiny_llama_dir, *args, env=env) for name, (args, env) in specs.items()}
    with ThreadPoolExecutor(len(contexts)) as pool:
        starts = {name: pool.submit(cm.__enter__) for name, cm in contexts.items()}
        try:
            running = {name: start.result() for name, start in starts.items()}
            yield running
            assert_no_server_errors(running)
        finally:  # stop them side by side too; each checks its server exited 0
            stops = [pool.submit(contexts[name].__exit__, None, None, None)
                     for name, start in starts.items() if start.exception() is None]
            for stop in stops:
                stop.result()


def assert_no_server_errors(servers: dict) -> None:
    """Nothing the tests did made a server error: no 5xx response counted, no traceback or error logged."""
    for name, server in servers.items():
        samples = scrape(server)
        errors = {k: v for k, v in samples.items() if k.startswith('kvgate:http_responses_total{status="5')}
        assert not errors, (name, errors)
        log = "".join(server.log)
        assert "Traceback" not in log and "ERROR" not in log, (name, log)


@pytest.fixture(scope="package")
def server(servers):
    return servers["default"]


@pytest.fixture(scope="package")
def auth_server(servers):
    return servers["auth"]


@pytest.fixture(scope="package")
def limited(servers):
    return servers["limited"]


@pytest.fixture(scope="package")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="package")
def limited_client(limited):
    with httpx.Client(base_url=limited.url, timeout=30, headers={"Authorization": f"Bearer {ENV_KEY}"}) as c:
        yield c
