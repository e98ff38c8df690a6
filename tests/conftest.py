"""Session fixtures: a tiny tokenizer and tiny random checkpoints of every supported architecture.

Built once per session (a second or two in all) under a tmp_path_factory dir. See tests/checkpoints.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run under the interpreter; it must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.checkpoints import ARCHS, build_tiny_checkpoint, build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """tokenizer.json + tokenizer_config.json of a 512-token byte-level BPE with ChatML specials."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer loaded with transformers.AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """`tiny_checkpoint(arch) -> Path`: the checkpoint dir of `arch`, built on first use."""
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_checkpoint(arch, root / arch, tiny_tokenizer_dir)
        return built[arch]

    return get


@pytest.fixture(scope="session", params=ARCHS, ids=ARCHS)
def tiny_model_dir(request, tiny_checkpoint) -> Path:
    """Each supported architecture in turn: llama, qwen2, qwen3, mistral."""
    return tiny_checkpoint(request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen3")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("mistral")


@pytest.fixture
def deadline():
    """Fail a test (instead of hanging the suite) when it runs past 120 s: a wedged engine step loop, a stream
    that never ends. SIGALRM interrupts the main thread, where in-process engines and asyncio.run live."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError("test ran past its 120 s deadline (engine hang?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on a small shared CPU: one intra-op thread wastes no time spinning (measured on 2 cores:
    test_sampling + test_engine_correctness take the same wall time or less, with ~25% less CPU)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_collection_modifyitems(config, items):
    """GPU tests (marker `gpu`) are deselected where there is no CUDA, so they count as not run, not as passed."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
