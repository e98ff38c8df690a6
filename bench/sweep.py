"""The load sweep: load levels one after another against one OpenAI-compatible server, each measured by
bench/levels.py, with an early stop once a level is saturated (bench/levels.py: saturation).

Levels run in ascending order of load. A level sends `warmup` requests first (the same load, left out of its
figures), then its measured ones: `requests` of them, or as many as it starts in `duration_s` seconds, or by
default 4 x concurrency requests (closed loop) or 2 minutes (open loop). Each level draws its own prompts (a seed
per level), so a server's prefix cache never serves one level the prompts of another.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bench.levels import error_examples, level_figures, saturation
from bench.loadgen import first_model, make_target, run_closed, run_open, server_info, session_for
from bench.prompts import Lengths, cycled, from_rows, read_rows, synthetic

DEFAULT_OPEN_LOOP_S = 120.0


@dataclass
class SweepSettings:
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None
    endpoint: str = "completions"
    concurrency: list[int] | None = None
    rate: list[float] | None = None
    burstiness: float = 1.0
    duration_s: float | None = None
    requests: int | None = None
    warmup: int = 0
    prompt_tokens: Lengths = Lengths("fixed", 512)
    max_tokens: Lengths = Lengths("fixed", 256)
    ignore_eos: bool = True
    dataset: str | None = None
    output_lengths: str = "data"  # with a dataset: "data" (its lengths where it has them) or "fixed" (--max-tokens)
    tokenizer: str | None = None
    seed: int = 0
    slo_ttft_s: float = 2.0
    slo_tpot_ms: float = 50.0
    timeout_s: float = 600.0
    stop_failed: float = 0.10
    stop_ttft_growth: float = 3.0
    stop_ttft_cap_s: float = 30.0

    def __post_init__(self) -> None:
        if self.concurrency and self.rate:
            raise ValueError("give load levels as --concurrency or as --rate, not both")
        if not self.concurrency and not self.rate:
            raise ValueError("give load levels: --concurrency N1,N2,... or --rate R1,R2,...")
        if self.duration_s is not None and self.requests is not None:
            raise ValueError("give --duration or --requests, not both")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be positive, got {self.burstiness}")

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["prompt_tokens"], out["max_tokens"] = str(self.prompt_tokens), str(self.max_tokens)
        out["api_key"] = "(set)" if self.api_key else None
        return out

    def levels(self) -> list[tuple[str, int | None, float | None]]:
        if self.concurrency:
            return [("concurrency", c, None) for c in sorted(self.concurrency)]
        return [("rate", None, r) for r in sorted(self.rate)]


def level_name(level: dict) -> str:
    if level["mode"] == "concurrency":
        return f"{level['concurrency']} users"
    return f"{level['rate']:g} req/s"


class Progress:
    """What the sweep reports as it goes (bench/sweep_report.py draws it with rich); this one says nothing."""

    def start_level(self, name: str, total: int | None) -> None: ...

    def request_done(self, record) -> None: ...

    def end_level(self, level: dict) -> None: ...

    def stopped(self, reason: str) -> None: ...


def _counter(tokenizer: str | None):
    if tokenizer is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def _prompt_source(s: SweepSettings, count_tokens):
    """prompts(level index) -> an endless stream of Prompts for that level."""
    if s.dataset is None:
        return lambda i: synthetic(s.endpoint, s.prompt_tokens, s.max_tokens, s.seed if i == 0 else f"{s.seed}/{i}")
    rows = from_rows(read_rows(s.dataset), s.dataset, s.max_tokens, s.output_lengths == "data", count_tokens)
    return lambda i: cycled(rows, s.seed + i)


async def run_sweep(s: SweepSettings, doc: dict, *, on_level=None, progress: Progress | None = None) -> dict:
    """Run every level into doc["levels"] (doc: the result document, its header and settings filled), calling
    on_level(doc, level, records) after each; stop early on saturation (doc["stopped_early"])."""
    progress = progress or Progress()
    count_tokens = _counter(s.tokenizer)
    prompts_for = _prompt_source(s, count_tokens)
    target = make_target(s.url, s.endpoint, model=s.model, api_key=s.api_key, timeout_s=s.timeout_s,
                         ignore_eos=s.ignore_eos, keep_text=count_tokens is not None)
    levels = s.levels()
    sources: set[str] = set()
    async with session_for(1) as probe:
        doc["header"]["server_info"] = await server_info(probe, target)
        if target.common["model"] is None:
            target.common["model"] = await first_model(probe, target)
    doc["header"]["model"] = target.common["model"]
    for i, (mode, concurrency, rate) in enumerate(levels):
        requests = s.requests
        duration = s.duration_s
        if requests is None and duration is None:
            if mode == "concurrency":
                requests = 4 * concurrency
            else:
                duration = DEFAULT_OPEN_LOOP_S
        total = None if requests is None else requests + s.warmup
        name = f"{concurrency} users" if mode == "concurrency" else f"{rate:g} req/s"
        progress.start_level(name, total)
        prompts = prompts_for(i)
        async with session_for(concurrency if mode == "concurrency" else 0) as session:
            if mode == "concurrency":
                records = await run_closed(session, target, prompts, concurrency=concurrency, requests=total,
                                           duration_s=duration, on_done=progress.request_done)
            else:
                records = await run_open(session, target, prompts, rate=rate, burstiness=s.burstiness,
                                         seed=s.seed + i, requests=total, duration_s=duration,
                                         on_done=progress.request_done)
        measured = [r for r in records if r.index >= s.warmup]
        level, how = level_figures(measured, mode=mode, concurrency=concurrency, rate=rate,
                                   burstiness=s.burstiness if mode == "rate" else None,
                                   slo_ttft_s=s.slo_ttft_s, slo_tpot_s=s.slo_tpot_ms / 1000,
                                   count_tokens=count_tokens)
        doc["levels"].append(level)
        for kind, message in error_examples(measured).items():
            doc["notes"].append(f"{name}: {level['errors'][kind]} x {kind}, e.g. {message}")
        sources |= how
        _token_notes(doc, sources)
        reason = saturation(measured, level, max_failed=s.stop_failed, ttft_growth=s.stop_ttft_growth,
                            ttft_cap_s=s.stop_ttft_cap_s, slo_ttft_s=s.slo_ttft_s)
        progress.end_level(level)
        if reason is not None:
            skipped = len(levels) - i - 1
            doc["stopped_early"] = f"saturated at {name}: {reason}" + (
                f"; {skipped} higher level{'s' if skipped > 1 else ''} not run" if skipped else "")
            progress.stopped(doc["stopped_early"])
        if on_level is not None:
            on_level(doc, level, measured)
        if reason is not None:
            break
    return doc


_TOKEN_NOTES = {
    "usage": "token counts: the server's usage (stream_options.include_usage)",
    "tokenizer": "token counts: the server sent no usage for some requests; those were counted with the local "
                 "tokenizer (--tokenizer)",
    "chunks": "token counts: the server sent no usage for some requests and no --tokenizer was given; their output "
              "tokens are the content chunks counted (one token a chunk, fewer if the server packs several) and "
              "their prompt tokens the token ids sent (0 for text prompts)",
}


def _token_notes(doc: dict, sources: set[str]) -> None:
    notes = [n for n in doc["notes"] if not n.startswith("token counts:")]
    doc["notes"] = [_TOKEN_NOTES[k] for k in ("usage", "tokenizer", "chunks") if k in sources] + notes


def new_document(s: SweepSettings, header: dict) -> dict:
    return {"kind": "sweep", "header": {**header, "url": s.url, "model": s.model, "server_info": None},
            "settings": s.as_dict(), "levels": [], "stopped_early": None,
            "notes": ["levels run in ascending order of load; warm-up requests are left out of the figures"]}
