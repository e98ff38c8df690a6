"""The figures of one load level, from its requests' records: throughput, goodput, latency distributions,
errors by kind, the measured concurrency; and the rule that calls a level saturated.

- TTFT: first content chunk - request sent. ITL: the gaps between content chunks. TPOT (per request):
  (last content chunk - first) / (output tokens - 1), for requests of two or more tokens. E2E: answer complete
  - request sent.
- The level's duration runs from its first measured request's start to its last one's end; rates are per
  second of it. mean_concurrency is Little's law: the sum of the requests' latencies over the duration.
- Goodput: completed requests whose TTFT <= slo_ttft_s and TPOT <= slo_tpot_s (a one-token answer has no TPOT
  and is judged by its TTFT), per second.
- Tokens: the server's `usage` (stream_options.include_usage); without it, a local tokenizer when one is given,
  else the content chunks are counted (and the prompt's length is its token ids', or 0 for text).
"""

from __future__ import annotations

from bench.stats import summary
from bench.stream_client import Record


def _tokens(rec: Record, count_tokens) -> tuple[int, int, str]:
    """(prompt tokens, output tokens, how they were counted) of a completed request."""
    if rec.usage_output is not None:
        return rec.usage_prompt or 0, rec.usage_output, "usage"
    prompt = rec.prompt
    if count_tokens is not None:
        text = prompt.text() if prompt is not None else ""
        n_prompt = len(text) if isinstance(text, list) else count_tokens(text)
        return n_prompt, count_tokens("".join(rec.texts or ())), "tokenizer"
    return (prompt.prompt_tokens or 0) if prompt is not None else 0, len(rec.chunk_times), "chunks"


def tpot(rec: Record, output_tokens: int) -> float | None:
    if len(rec.chunk_times) < 1 or output_tokens < 2:
        return None
    return (rec.chunk_times[-1] - rec.chunk_times[0]) / (output_tokens - 1)


def level_figures(records: list[Record], *, mode: str, concurrency: int | None, rate: float | None,
                  burstiness: float | None, slo_ttft_s: float, slo_tpot_s: float,
                  count_tokens=None) -> tuple[dict, set[str]]:
    """(the level's fields, how its tokens were counted: a subset of {"usage", "tokenizer", "chunks"})."""
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error_kind] = errors.get(r.error_kind, 0) + 1
    duration = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    counted, sources = [], set()
    for r in ok:
        n_prompt, n_out, how = _tokens(r, count_tokens)
        counted.append((r, n_prompt, n_out))
        sources.add(how)
    ttft, tpots, good = [], [], 0
    for r, _, n_out in counted:
        first = r.ttft
        t = tpot(r, n_out)
        if first is not None:
            ttft.append(first)
        if t is not None:
            tpots.append(t)
        if first is not None and first <= slo_ttft_s and (t is None or t <= slo_tpot_s):
            good += 1
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    prompt_tokens = sum(c[1] for c in counted)
    output_tokens = sum(c[2] for c in counted)
    level = {
        "mode": mode, "concurrency": concurrency, "rate": rate, "burstiness": burstiness,
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok), "errors": errors,
        "duration_s": duration, "requests_per_s": per_s(len(ok)), "output_tokens_per_s": per_s(output_tokens),
        "total_tokens_per_s": per_s(prompt_tokens + output_tokens), "goodput_requests_per_s": per_s(good),
        "mean_prompt_tokens": prompt_tokens / len(ok) if ok else 0.0,
        "mean_output_tokens": output_tokens / len(ok) if ok else 0.0,
        "mean_concurrency": per_s(sum(r.end - r.start for r in records)),
        "ttft_s": summary(ttft), "itl_s": summary(itl), "tpot_s": summary(tpots),
        "e2e_s": summary(r.end - r.start for r in ok),
    }
    return level, sources


def error_examples(records: list[Record]) -> dict[str, str]:
    """One message per error kind."""
    examples: dict[str, str] = {}
    for r in records:
        if not r.ok and r.error_kind not in examples:
            examples[r.error_kind] = r.error or r.error_kind
    return examples


def saturation(records: list[Record], level: dict, *, max_failed: float, ttft_growth: float, ttft_cap_s: float,
               slo_ttft_s: float) -> str | None:
    """Why the level is saturated, or None. Saturated when any of:
    - more than `max_failed` of its requests failed;
    - its TTFT p50 exceeds `ttft_cap_s`;
    - TTFT grows without bound: of its completed requests in the order they were sent (8 at least), the last
      quarter's TTFT p50 is more than `ttft_growth` times the first quarter's and above the TTFT service level
      (a queue that builds up; the service level keeps millisecond noise from counting)."""
    if level["requests"] and level["failed"] / level["requests"] > max_failed:
        return (f"{level['failed']} of {level['requests']} requests failed "
                f"({level['failed'] / level['requests']:.0%} > {max_failed:.0%})")
    p50 = level["ttft_s"]["p50"]
    if p50 is not None and p50 > ttft_cap_s:
        return f"TTFT p50 {p50:.2f} s is above the cap of {ttft_cap_s:g} s"
    timed = [r.ttft for r in sorted(records, key=lambda r: r.start) if r.ok and r.ttft is not None]
    if len(timed) >= 8:
        quarter = len(timed) // 4
        head, tail = summary(timed[:quarter])["p50"], summary(timed[-quarter:])["p50"]
        if tail > ttft_growth * head and tail > slo_ttft_s:
            return (f"TTFT grows without bound: p50 {head:.3f} s over the first quarter of requests, {tail:.3f} s "
                    f"over the last (more than {ttft_growth:g}x, above the {slo_ttft_s:g} s service level)")
    return None


def legacy_result(records: list[Record], *, url: str, endpoint: str, model: str, concurrency: int,
                  num_requests: int) -> dict:
    """The keys `kvgate bench load` has always printed (errors: up to 5 distinct messages)."""
    level, _ = level_figures(records, mode="concurrency", concurrency=concurrency, rate=None, burstiness=None,
                             slo_ttft_s=float("inf"), slo_tpot_s=float("inf"))
    ok = [r for r in records if r.ok]
    messages: list[str] = []
    for r in records:
        if not r.ok and r.error not in messages and len(messages) < 5:
            messages.append(r.error)
    return {
        "url": url, "endpoint": endpoint, "model": model, "concurrency": concurrency, "num_requests": num_requests,
        "completed": level["completed"], "failed": level["failed"], "errors": messages,
        "duration_s": level["duration_s"], "output_tokens": round(level["mean_output_tokens"] * len(ok)),
        "content_chunks": sum(len(r.chunk_times) for r in ok),
        "output_tokens_per_s": level["output_tokens_per_s"], "requests_per_s": level["requests_per_s"],
        "ttft_s": level["ttft_s"], "tpot_s": level["tpot_s"], "itl_s": level["itl_s"], "e2e_s": level["e2e_s"],
    }
