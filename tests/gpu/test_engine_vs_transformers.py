"""On the GPU, in bf16 with random weights at real head sizes: the engine's greedy output matches transformers'
greedy `generate`, token for token where numerics allow; where a token differs, each side's token is within the
other's top-5 at that first divergence (bf16 rounding differs between kernels; after a divergence the two
continue from different prefixes, so only the first one is judged). With CUDA graphs and compiled ops on, every
attention backend available, chunked prefill and prefix-cache hits."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from tests.checkpoints import build_tiny_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 32
TOP = 5
# nats. Seen on an H200: qwen3 mean 0.044-0.045, max <= 0.28; llama (no q/k norm: larger logits) mean 0.093-0.100,
# max <= 0.88. Rope at half the positions failed sooner, at the top-5 check.
MEAN_GAP, MAX_GAP = 0.15, 1.5


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=512, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                  num_attention_heads=16, max_position_embeddings=8192, initializer_range=0.1,
                  bos_token_id=None, eos_token_id=0, pad_token_id=3, dtype="bfloat16")
    if arch == "qwen3":  # head_dim 128, GQA 2, q/k norm
        return tf.Qwen3Config(**common, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    # head_dim 64, GQA 8
    return tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=rope)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def checkpoint(request, tmp_path_factory):
    import transformers as tf

    out = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config(request.param), dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok = build_tiny_tokenizer(out / "_tok")
    for f in tok.iterdir():
        shutil.copy(f, out / f.name)
    hf = model.to("cuda").eval()
    yield out, hf
    del hf
    torch.cuda.empty_cache()


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(4, 512) for _ in range(300)]  # several prompts share 300 tokens: prefix-cache hits
    lengths = (1, 15, 16, 17, 100, 700, 2000)
    return [[rng.randrange(4, 512) for _ in range(n)] for n in lengths] + [shared + [7] * n for n in (1, 50, 333)]


def _hf_greedy(hf, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits behind each."""
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=3)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


def _hf_top_after(hf, prefix: list[int]) -> list[int]:
    with torch.inference_mode():
        logits = hf(torch.tensor([prefix], device="cuda")).logits[0, -1]
    return logits.topk(TOP).indices.tolist()


def _check(hf, prompts, outputs) -> list[float]:
    """Asserts the contract for every prompt; returns |our logprob - HF's| for every top-5 token at every position
    before the first divergence (where both sides saw the same tokens)."""
    gaps = []
    for prompt, out in zip(prompts, outputs):
        ours = out.outputs[0].token_ids
        theirs, logits = _hf_greedy(hf, prompt)
        assert len(ours) == NEW_TOKENS
        d = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), NEW_TOKENS)
        hf_logprobs = torch.log_softmax(logits, dim=-1)
        for i in range(d):
            gaps += [abs(lp.logprob - hf_logprobs[i, t].item()) for t, lp in out.outputs[0].logprobs[i].items()]
        if d == NEW_TOKENS:
            continue
        our_top = sorted(out.outputs[0].logprobs[d], key=lambda t: -out.outputs[0].logprobs[d][t].logprob)[:TOP]
        their_top = _hf_top_after(hf, prompt + theirs[:d])
        assert theirs[d] in our_top, f"prompt of {len(prompt)}: token {d}: HF's {theirs[d]} not in our top-5"
        assert ours[d] in their_top, f"prompt of {len(prompt)}: token {d}: our {ours[d]} not in HF's top-5"
    return gaps


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("budget", [8192, 256], ids=["whole", "chunked"])
def test_greedy_matches_transformers(checkpoint, backend, budget):
    model_dir, hf = checkpoint
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP)
    with LLM(str(model_dir), dtype="bfloat16", attention_backend=backend, max_num_batched_tokens=budget,
             max_num_seqs=16, gpu_memory_utilization=0.5) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        again = llm.generate(prompts[-3:], params, use_tqdm=False)  # now every shared prefix is cached
        assert all(o.num_cached_tokens >= 288 for o in again)
    gaps = torch.tensor(_check(hf, prompts, outputs) + _check(hf, prompts[-3:], again))
    # bf16 kernels and compiled ops round differently from HF's eager bf16, and near-ties among random logits
    # flip, so whole outputs may differ (on llama with CUDA graphs none of 10 matched, with eager 4). Where both
    # saw the same tokens the logprobs must agree to bf16 noise.
    print(f"logprob gaps over {len(gaps)}: mean {gaps.mean():.4f} max {gaps.max():.4f}")
    assert len(gaps) >= 5 * 13, "too few positions before the first divergences to judge"
    assert gaps.mean() <= MEAN_GAP and gaps.max() <= MAX_GAP, f"logprob gaps: mean {gaps.mean()}, max {gaps.max()}"
