"""A whole engine with the triton attention backend on the CPU (Triton's interpreter): the fused rope-and-store
kernel, decode steps, chunked prefill whose steps mix decodes (the decode kernel) with prompt chunks (the prefill
kernel) and prefix-cache hits give the torch backend's greedy tokens."""

from __future__ import annotations

import random

import pytest

from engine import LLM, EngineConfig, SamplingParams


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_greedy_matches_torch_backend(tiny_checkpoint, arch):
    rng = random.Random(3)
    shared = [rng.randrange(4, 512) for _ in range(40)]  # 2.5 blocks, shared by the last two prompts
    prompts = [[rng.randrange(4, 512) for _ in range(n)] for n in (1, 15, 33)]
    prompts += [shared + [rng.randrange(4, 512) for _ in range(n)] for n in (3, 20)]
    greedy = SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)

    def run(backend: str):
        config = EngineConfig(model=str(tiny_checkpoint(arch)), attention_backend=backend, block_size=16,
                              device="cpu", num_kv_blocks=48, max_num_batched_tokens=24, in_process=True)
        with LLM(config=config) as engine:
            first = engine.generate(prompts, greedy, use_tqdm=False)
            second = engine.generate(prompts[-2:], greedy, use_tqdm=False)
        assert [o.num_cached_tokens for o in second] == [32, 48]  # the full blocks of each prompt
        return [o.outputs[0].token_ids for o in first + second]

    assert run("triton") == run("torch")


def test_warmup_mixed_step_samples_every_row(tiny_checkpoint):
    """The start-up step that compiles the eager decode and small-tile prefill variants on CUDA is a valid batch:
    here it runs through the same kernels on the interpreter and samples a token for each of its five rows."""
    from engine.core import EngineCore

    config = EngineConfig(model=str(tiny_checkpoint("qwen3")), attention_backend="triton", block_size=16,
                          device="cpu", num_kv_blocks=16, in_process=True)
    runner = EngineCore(config).runner
    batch = runner._small_mixed()
    tokens, _ = runner.execute(batch)
    assert [row.num_tokens for row in batch.rows] == [1, 1, 1, 1, 8]
    assert len(tokens) == 5 and all(isinstance(t, int) for t in tokens)
