"""Offline engine benchmark: kvgate's LLM.generate against transformers' generate, same weights and prompts,
in the same run (absolute CPU figures are meaningless across machines; ratios are not)."""

from __future__ import annotations

import gc
import time

import torch

from bench.workloads import Workload, make_prompts
from engine.config import EngineConfig


def run_kvgate(config: EngineConfig, workload: Workload, repeats: int = 1) -> dict:
    from engine import LLM, SamplingParams

    with LLM(config=config) as llm:
        prompts = make_prompts(workload, llm.info.vocab_size)
        params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        best = None
        for _ in range(repeats):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return _result("kvgate", workload, generated, best)


def run_hf(model_dir: str, workload: Workload, repeats: int = 1) -> dict:
    """transformers generate, one request at a time (its plain, unbatched use), fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    prompts = make_prompts(workload, model.config.vocab_size)
    kwargs = dict(do_sample=False, max_new_tokens=workload.output_len, min_new_tokens=workload.output_len,
                  pad_token_id=model.config.eos_token_id)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]], device=device), do_sample=False, max_new_tokens=8,
                       pad_token_id=model.config.eos_token_id)
        best, generated = None, 0
        for _ in range(repeats):
            start, generated = time.perf_counter(), 0
            for prompt in prompts:
                out = model.generate(torch.tensor([prompt], device=device), **kwargs)
                generated += out.shape[1] - len(prompt)
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
    del model
    gc.collect()
    return _result("hf", workload, generated, best)


def _result(backend: str, workload: Workload, generated: int, elapsed: float) -> dict:
    prompt_tokens = workload.num_requests * workload.prompt_len
    return {
        "backend": backend,
        "workload": workload.name,
        "requests": workload.num_requests,
        "output_tokens": generated,
        "seconds": round(elapsed, 3),
        "output_tokens_per_s": round(generated / elapsed, 2),
        "total_tokens_per_s": round((generated + prompt_tokens) / elapsed, 2),
    }
