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


def run_batch(config: EngineConfig, workload: Workload, repeats: int = 1) -> dict:
    """The same prompts as a JSONL file through `kvgate batch run`'s runner (completions with token-id prompts):
    what the batch front door costs over LLM.generate. Engine start-up is not timed, as for run_kvgate."""
    import tempfile

    import orjson

    from batch.job import BatchJob
    from engine.model_source import read_model_config, resolve_model

    vocab = read_model_config(resolve_model(config.model, config.load_format)).vocab_size
    prompts = make_prompts(workload, vocab)
    best, generated = None, 0
    with tempfile.TemporaryDirectory() as tmp:
        source = f"{tmp}/in.jsonl"
        with open(source, "wb") as f:
            f.writelines(orjson.dumps({"prompt": p}) + b"\n" for p in prompts)
        defaults = {"max_tokens": workload.output_len, "temperature": 0.0, "ignore_eos": True}
        for _ in range(repeats):
            summary = BatchJob(source, f"{tmp}/out.jsonl", defaults=defaults, engine_config=config).run()
            assert summary.failed == 0, "benchmark lines failed"
            best = summary.wall_s if best is None else min(best, summary.wall_s)
            generated = summary.completion_tokens
    return _result("batch", workload, generated, best)


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
