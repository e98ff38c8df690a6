"""Turn the core's per-step token ids into RequestOutputs: detokenize, apply stop strings, build logprobs,
and fan n completions of one request back together."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer, NullDetokenizer
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.protocol import RequestUpdate, TokenLogprobs
from engine.sampling_params import SamplingParams


@dataclass
class Completion:
    """One of a request's n completions; the core knows it as core_id."""
    index: int
    core_id: str
    detokenizer: IncrementalDetokenizer | NullDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # as they arrive, the first None

    def output(self, text_from: int = 0, tokens_from: int = 0) -> CompletionOutput:
        """Cumulative output, or with offsets only what came after them (streaming deltas)."""
        text = self.detokenizer.output_text
        return CompletionOutput(self.index, text[text_from:], self.token_ids[tokens_from:],
                                None if self.logprobs is None else self.logprobs[tokens_from:],
                                self.finish_reason, self.stop_reason)


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[Completion]
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    @property
    def prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """Once complete. Each of the n completions computes them (none may sample before its own are
        done, so a stream never shows a token before them); the first to complete serves."""
        for c in self.completions:
            if c.prompt_logprobs is not None and len(c.prompt_logprobs) == len(self.prompt_token_ids):
                return c.prompt_logprobs
        return None

    def output(self, offsets: list[tuple[int, int]] | None = None) -> RequestOutput:
        """offsets[i]: (text length, token count) of completion i already seen; None for cumulative output."""
        outputs = [c.output(*offsets[c.index]) if offsets else c.output() for c in self.completions]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             self.num_cached_tokens, self.metrics, prompt_logprobs=self.prompt_logprobs)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._by_core_id: dict[str, tuple[RequestState, Completion]] = {}

    def add(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: list[SamplingParams],
            arrival_time: float) -> list[str]:
        """Register a request whose n completions run with params[i]; returns their core ids."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        completions = []
        for i, p in enumerate(params):
            detok = NullDetokenizer() if not p.detokenize else IncrementalDetokenizer(
                self.tokenizer, prompt_ids, skip_special_tokens=p.skip_special_tokens, stop=p.stop,
                include_stop_str_in_output=p.include_stop_str_in_output)
            core_id = request_id if len(params) == 1 else f"{request_id}#{i}"
            completions.append(Completion(i, core_id, detok, logprobs=[] if p.logprobs is not None else None,
                                          prompt_logprobs=None if p.prompt_logprobs is None else [None]))
        state = RequestState(request_id, prompt, prompt_ids, params[0], completions, RequestMetrics(arrival_time))
        self.requests[request_id] = state
        for c in completions:
            self._by_core_id[c.core_id] = (state, c)
        return [c.core_id for c in completions]

    def abort(self, request_id: str) -> tuple[list[str], RequestOutput | None]:
        """Forget a request. Returns the core ids still running, which the caller must abort in the core,
        and the request's final output."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return [], None
        live = [c.core_id for c in state.completions if c.finish_reason is None]
        for c in state.completions:
            self._by_core_id.pop(c.core_id, None)
            c.finish_reason = c.finish_reason or "abort"
        state.metrics.finished_time = time.time()
        return live, state.output()

    def process(self, updates: list[RequestUpdate]) -> tuple[list[RequestState], list[str]]:
        """Apply one step. Returns the requests that changed, and core ids to abort in the core (completions a
        stop string ended). Building outputs is left to the caller: a slow reader builds one for several steps."""
        now = time.time()
        changed: dict[str, RequestState] = {}
        to_abort: list[str] = []
        for update in updates:
            entry = self._by_core_id.get(update.request_id)
            if entry is None:
                continue  # finished or aborted here already
            state, completion = entry
            self._apply(state, completion, update, now)
            if completion.finish_reason is not None:
                del self._by_core_id[completion.core_id]
                if update.finish_reason is None:
                    to_abort.append(completion.core_id)
            changed[state.request_id] = state
        for state in changed.values():
            if state.finished:
                state.metrics.finished_time = now
                del self.requests[state.request_id]
        return list(changed.values()), to_abort

    def _apply(self, state: RequestState, c: Completion, update: RequestUpdate, now: float) -> None:
        metrics = state.metrics
        if update.first_scheduled_time is not None and metrics.first_scheduled_time is None:
            metrics.first_scheduled_time = update.first_scheduled_time
        if update.new_token_ids:
            if metrics.last_token_time is not None and now != metrics.last_token_time:  # once per step, not per n
                metrics.inter_token_latencies.append(now - metrics.last_token_time)
            metrics.first_token_time = metrics.first_token_time or now
            metrics.last_token_time = now
        state.num_cached_tokens = max(state.num_cached_tokens, update.num_cached_tokens)
        c.token_ids.extend(update.new_token_ids)
        if c.logprobs is not None and update.logprobs:
            for token, entry in zip(update.new_token_ids, update.logprobs):
                c.logprobs.append(self._logprob_dict(c.detokenizer, token, entry))
        for entry in update.prompt_logprobs or ():  # the entry of the prompt token after those known
            token = state.prompt_token_ids[len(c.prompt_logprobs)]
            c.prompt_logprobs.append(self._logprob_dict(c.detokenizer, token, entry))

        new_ids = update.new_token_ids
        params = state.params
        if (update.finish_reason == "stop" and not params.include_stop_str_in_output and new_ids
                and new_ids[-1] in params.stop_ids()):
            new_ids = new_ids[:-1]  # a stop token (EOS, stop_token_ids) is not part of the text; the token that
            # completed a structured output's grammar is
        # stop strings count only once min_tokens tokens are out (vLLM's rule)
        stop_string = c.detokenizer.add_tokens(new_ids, len(c.token_ids) >= params.min_tokens) if new_ids else None
        if stop_string is not None:
            c.finish_reason, c.stop_reason = "stop", stop_string
        elif update.finish_reason is not None:
            c.finish_reason, c.stop_reason = update.finish_reason, update.stop_reason
            c.detokenizer.finish()

    @staticmethod
    def _logprob_dict(detok: IncrementalDetokenizer, token: int, entry: TokenLogprobs) -> dict[int, Logprob]:
        result = {token: Logprob(entry.logprob, entry.rank, detok.decode_token(token))}
        for rank, (alt, lp) in enumerate(zip(entry.top_ids, entry.top_logprobs), start=1):
            if alt not in result:
                result[alt] = Logprob(lp, rank, detok.decode_token(alt))
        return result
