"""serve-N: the engine behind `kvgate serve` against the same engine offline, on the same requests.

First `LLM.generate` runs the N requests at once (after a warm-up call), then a `kvgate serve` process with the
same engine settings takes them from N concurrent streaming clients (`kvgate bench load`, after a warm-up
round). Warm-ups send other prompts, so every measured prompt is prefilled, not found in the prefix cache.
Both sides detokenize, as a user's offline run would. The ratio of their output tokens/s is what the HTTP path
costs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time

from bench.gateway_speed import _wait_healthy
from bench.prompts import synthetic_prompts
from engine.config import EngineConfig

WARMUP_SEED = 1  # warm-up prompts from another seed than the measured ones (seed 0)


def serve_engine(port: int, engine_fields: str, max_concurrent_requests: int) -> None:
    """The server process: the real gateway over the real engine."""
    from gateway.config import ServerConfig
    from gateway.server import serve

    engine = EngineConfig(**json.loads(engine_fields))
    serve(ServerConfig(engine=engine, port=port, max_concurrent_requests=max_concurrent_requests))


def run_offline(config: EngineConfig, prompts: list[list[int]], warmup: list[list[int]], max_tokens: int) -> dict:
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(config=config) as llm:
        llm.generate(warmup, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"output_tokens": tokens, "seconds": round(seconds, 3), "output_tokens_per_s": round(tokens / seconds, 2)}


def run_served(config: EngineConfig, concurrency: int, prompt_tokens: int, max_tokens: int, port: int) -> dict:
    fields = json.dumps(dataclasses.asdict(config))
    code = f"from bench.serve_speed import serve_engine; serve_engine({port}, {fields!r}, {4 * concurrency})"
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen([sys.executable, "-c", code], stderr=log, stdout=log, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, server, timeout_s=900)
        except RuntimeError as exc:
            log.seek(0)
            raise RuntimeError(f"{exc}; its log ends: {log.read()[-2000:]}") from exc
        load = [sys.executable, "-m", "kvgate", "bench", "load", "--url", url,
                "--concurrency", str(concurrency), "--requests", str(concurrency), "--prompt-tokens",
                str(prompt_tokens)]
        # the warm-up round: other prompts (none of the measured ones is in the prefix cache), 8 tokens each
        subprocess.run(load + ["--max-tokens", "8", "--seed", str(WARMUP_SEED)], capture_output=True, text=True,
                       check=True)
        out = subprocess.run(load + ["--max-tokens", str(max_tokens)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(120)
        log.close()


def run(config: EngineConfig, concurrency: int, prompt_tokens: int, max_tokens: int, port: int) -> dict:
    prompts = synthetic_prompts("completions", prompt_tokens, concurrency)  # what `bench load` sends
    warmup = synthetic_prompts("completions", prompt_tokens, concurrency, WARMUP_SEED)
    offline = run_offline(config, prompts, warmup, max_tokens)
    served = run_served(config, concurrency, prompt_tokens, max_tokens, port)
    return {
        "workload": f"serve-{concurrency}", "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
        "model": config.model, "offline": offline, "served": served,
        "served_vs_offline": round(served["output_tokens_per_s"] / offline["output_tokens_per_s"], 3),
    }
