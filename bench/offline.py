"""Offline engine benchmark: kvgate's LLM.generate against transformers on the same model shape and prompts, in the
same run (absolute CPU figures are meaningless across machines; ratios are not).

Each backend gets one warm-up call, then timed calls: throughput = output tokens / wall time of one call (the best
of `repeats`); a ttft workload reports the median of several 1-token calls. A one-request workload (bs1) also
reports decode tokens/s: the tokens after the first over the time from the first token to the last, which leaves
the prefill out. Every call after the first shifts the
prompts' token ids (workloads.shifted), so kvgate's prefix cache never serves a timed prefill from an earlier call.
"""

from __future__ import annotations

import gc
import math
import statistics
import time

import torch

from bench.workloads import Requests, Workload, make_requests, shifted
from engine.config import EngineConfig
from engine.model_source import read_model_config, resolve_model

TTFT_RUNS = 5  # timed calls of a ttft workload, at least
WARMUP_TOKENS = 8  # output tokens per request in the warm-up call
CONTINUOUS = {"nano", "nano-fixed"}  # run by transformers' continuous batching; the rest by its generate


def run_kvgate(config: EngineConfig, workload: Workload, repeats: int = 1) -> dict:
    from engine import LLM, SamplingParams

    with LLM(config=config) as llm:
        vocab = llm.info.vocab_size
        reqs = make_requests(workload, vocab)

        def run(offset: int, lens: list[int]):
            params = [SamplingParams(temperature=workload.temperature, max_tokens=n, ignore_eos=True,
                                     detokenize=False) for n in lens]
            start = time.perf_counter()
            outs = llm.generate(shifted(reqs.prompts, offset, vocab), params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            return elapsed, sum(len(o.outputs[0].token_ids) for o in outs), outs

        timed = _measure(run, workload, reqs, repeats)
        outs = [o for _, _, call in timed for o in call]
        extra = {"dtype": llm.info.dtype, "quantization": config.quantization,
                 "max_batch_total_tokens": llm.info.max_batch_total_tokens,
                 # prompt tokens the prefix cache served in the timed calls: 0 unless prompts share prefixes
                 "cached_prompt_tokens": sum(o.num_cached_tokens for o in outs)}
        if workload.ttft:  # as the engine's own metrics saw it: arrival to first token, in the front end
            extra["ttft_ms_engine"] = _ms(statistics.median(
                o.metrics.first_token_time - o.metrics.arrival_time for o in outs))
        elif len(reqs.prompts) == 1:  # first and last token as the front end received them
            extra["decode_tokens_per_s"] = max(_decode_rate(len(o.outputs[0].token_ids), o.metrics.first_token_time,
                                                            o.metrics.last_token_time) for o in outs)
    return _result("kvgate", "LLM.generate", workload, reqs, *_figure(workload, timed), **extra)


def run_batch(config: EngineConfig, workload: Workload, repeats: int = 1) -> dict:
    """The same prompts as a JSONL file through `kvgate batch run`'s runner (completions with token-id prompts):
    what the batch front door costs over LLM.generate. Engine start-up is not timed, and each run starts an
    engine of its own (an empty prefix cache), so no warm-up call is made."""
    import tempfile

    import orjson

    from batch.job import BatchJob

    model_dir = resolve_model(config.model, config.load_format, config.tokenizer)
    reqs = make_requests(workload, read_model_config(model_dir).vocab_size)
    best, generated = None, 0
    with tempfile.TemporaryDirectory() as tmp:
        source = f"{tmp}/in.jsonl"
        with open(source, "wb") as f:
            f.writelines(orjson.dumps({"prompt": p, "max_tokens": n}) + b"\n"
                         for p, n in zip(reqs.prompts, reqs.output_lens))
        defaults = {"temperature": workload.temperature, "ignore_eos": True}
        for _ in range(repeats):
            summary = BatchJob(source, f"{tmp}/out.jsonl", defaults=defaults, engine_config=config).run()
            assert summary.failed == 0, "benchmark lines failed"
            best = summary.wall_s if best is None else min(best, summary.wall_s)
            generated = summary.completion_tokens
    return _result("batch", "kvgate batch run", workload, reqs, generated, best)


def run_hf(config: EngineConfig, workload: Workload, repeats: int = 1) -> dict:
    """transformers on the engine's model, dtype and device: `generate` one request at a time (sdpa, dynamic cache,
    greedy, min_new_tokens = max_new_tokens so it never stops early), or for the nano workloads its continuous
    batching, greedy (docs/workloads.md allows it for peers), with each request's own max_new_tokens."""
    try:
        return _run_hf(config, workload, repeats)
    finally:  # the model is unreachable now: free its memory before the next backend's engine sizes its KV pool
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _run_hf(config: EngineConfig, workload: Workload, repeats: int) -> dict:
    model = _hf_model(config)
    vocab = model.config.vocab_size
    reqs = make_requests(workload, vocab)
    if workload.name in CONTINUOUS:
        run, extra = _hf_continuous(model, reqs, vocab, config)
    else:
        run, extra = _hf_generate(model, reqs, vocab)
    timed = _measure(run, workload, reqs, repeats)
    if len(reqs.prompts) == 1 and not workload.ttft and workload.name not in CONTINUOUS:
        extra["decode_tokens_per_s"] = max(rate for _, _, rates in timed for rate in rates)
    return _result("hf", extra.pop("api"), workload, reqs, *_figure(workload, timed), temperature=0.0, **extra)


def _hf_model(config: EngineConfig):
    """Random weights from the config for load_format=dummy (initialized on the device: an 8B model in seconds),
    else the checkpoint's; the dtype the engine picks (engine.model_runner's rule)."""
    from transformers import AutoModelForCausalLM

    from engine.model_runner import resolve_device, resolve_dtype

    model_dir = resolve_model(config.model, config.load_format, config.tokenizer)
    hf_config = read_model_config(model_dir)
    device = resolve_device(config.device)
    kwargs = {"dtype": resolve_dtype(config.dtype, hf_config, device), "attn_implementation": "sdpa"}
    if config.load_format == "dummy":
        with device:
            model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device)
    return model.eval()


def _hf_generate(model, reqs: Requests, vocab: int):
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    extra = {"api": "generate (dynamic cache), one request at a time",
             "attention": model.config._attn_implementation, "dtype": str(model.dtype).removeprefix("torch.")}

    @torch.inference_mode()
    def run(offset: int, lens: list[int]):
        generated, rates, start = 0, [], time.perf_counter()
        for prompt, n in zip(shifted(reqs.prompts, offset, vocab), lens):
            ids = torch.tensor([prompt], device=model.device)
            clock = _TokenClock()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=pad, streamer=clock)
            generated += out.shape[1] - len(prompt)
            rates.append(_decode_rate(n, clock.times[1], clock.times[-1]))  # times[0]: the prompt
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, generated, rates

    return run, extra


class _TokenClock:
    """A generate() streamer that only notes when each put() arrives: the prompt first, then each new token (it
    has been copied to the host by then, as a streamer's tokens are)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_continuous(model, reqs: Requests, vocab: int, config: EngineConfig):
    """The machinery of `generate_batch` (a ContinuousBatchingManager from continuous_batching_context_manager),
    driven request by request because generate_batch takes one max_new_tokens for all. The manager's CUDA-graph
    warm-up runs as the context opens, outside the timed part, as the engine's start-up is for kvgate."""
    import transformers
    from transformers import GenerationConfig

    if not hasattr(model, "continuous_batching_context_manager"):
        raise RuntimeError(f"transformers {transformers.__version__} has no continuous batching (generate_batch); "
                           f"the {', '.join(sorted(CONTINUOUS))} workloads need transformers >= 5 for the hf peer")
    # eos_token_id=-1: no end of sequence, every request runs to its max_new_tokens (ignore_eos)
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(reqs.output_lens))
    kwargs = {} if model.device.type == "cuda" else {"continuous_batching_config": _cpu_cb_config(reqs, config)}
    extra = {"api": "continuous batching (ContinuousBatchingManager, as generate_batch; per-request max_new_tokens)",
             "dtype": str(model.dtype).removeprefix("torch.")}

    def run(offset: int, lens: list[int]):
        with model.continuous_batching_context_manager(generation_config=generation, **kwargs) as manager:
            extra["attention"] = model.config._attn_implementation  # what the manager switched to
            start = time.perf_counter()
            for prompt, n in zip(shifted(reqs.prompts, offset, vocab), lens):
                manager.add_request(input_ids=prompt, max_new_tokens=n)
            results = _collect(manager, len(lens))
            elapsed = time.perf_counter() - start
        return elapsed, sum(len(r.generated_tokens) for r in results), results

    return run, extra


def _cpu_cb_config(reqs: Requests, config: EngineConfig):
    """On a GPU transformers sizes its paged cache from free memory (the default config, as the peer figure in
    docs/workloads.md was measured); on a CPU it would take all RAM, and fill attention masks as large for
    seconds: hold it to what the workload needs, with kvgate's token budget per step."""
    from transformers.generation import ContinuousBatchingConfig

    page = ContinuousBatchingConfig().page_size
    blocks = math.ceil((reqs.prompt_tokens + reqs.output_tokens) / page) + len(reqs.prompts)
    return ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=config.max_num_batched_tokens)


def _collect(manager, count: int) -> list:
    done = []
    while len(done) < count:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"transformers' continuous batching stopped with {count - len(done)} requests "
                                   f"unfinished (its log says why)")
        elif result.is_finished():
            if result.error is not None:
                raise RuntimeError(f"transformers' continuous batching failed a request: {result.error}")
            done.append(result)
    return done


def _measure(run, workload: Workload, reqs: Requests, repeats: int) -> list[tuple]:
    """run(offset, output_lens) -> (seconds, generated tokens, outputs). One warm-up call (at an offset no timed
    call uses, WARMUP_TOKENS each), then the timed calls; returns what they returned."""
    calls = max(repeats, TTFT_RUNS) if workload.ttft else repeats
    run(calls, [min(n, WARMUP_TOKENS) for n in reqs.output_lens])
    return [run(offset, reqs.output_lens) for offset in range(calls)]


def _figure(workload: Workload, timed: list[tuple]) -> tuple[int, float]:
    """(generated tokens, seconds) to report: the fastest call's, or for a ttft workload the median seconds."""
    if workload.ttft:
        return timed[0][1], statistics.median(t[0] for t in timed)
    seconds, generated, _ = min(timed, key=lambda t: t[0])
    return generated, seconds


def _decode_rate(tokens: int, first: float, last: float) -> float:
    """Tokens after the first, per second from the first token to the last."""
    return round((tokens - 1) / (last - first), 2) if tokens > 1 and last > first else 0.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _result(backend: str, api: str, workload: Workload, reqs: Requests, generated: int, seconds: float,
            **extra) -> dict:
    result = {
        "backend": backend,
        "api": api,
        "workload": workload.name,
        "requests": len(reqs.prompts),
        "prompt_tokens": reqs.prompt_tokens,
        "output_tokens": generated,
        "seconds": round(seconds, 6),
        "output_tokens_per_s": round(generated / seconds, 2),
        "total_tokens_per_s": round((generated + reqs.prompt_tokens) / seconds, 2),
        "temperature": workload.temperature,
    }
    if workload.ttft:
        result["ttft_ms"] = _ms(seconds)
    return {**result, **extra}
