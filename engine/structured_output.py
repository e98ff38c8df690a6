"""Structured output with llguidance: a request's StructuredOutputsParams as a grammar, one matcher per sequence,
and the step's token bitmask.

A grammar is compiled once per distinct spec and kept (`GrammarCache`); each sequence gets a copy of the
compiled matcher, which follows the tokens it is given (`consume`). The front end compiles too, to refuse a
grammar that cannot be compiled when the request is submitted, before the core sees it.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import llguidance
import torch
from llguidance import LLMatcher

from engine.errors import InvalidRequestError
from engine.sampling_params import StructuredOutputsParams

# JSON is generated compact: with flexible whitespace a model may pad with newlines until max_tokens ends it.
_JSON_OPTIONS = {"whitespace_flexible": False}
_CACHE_SIZE = 256  # distinct grammars kept compiled


def grammar_of(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for spec; InvalidRequestError when it is not even well formed."""
    try:
        if spec.json is not None:
            return LLMatcher.grammar_from_json_schema(spec.json, defaults=_JSON_OPTIONS)
        if spec.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if spec.regex is not None:
            return LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
            return LLMatcher.grammar_from_lark(f"start: {alternatives}")
        return LLMatcher.grammar_from_lark(spec.grammar)
    except (ValueError, TypeError) as exc:  # a schema given as text that is not JSON, say
        raise InvalidRequestError(f"structured_outputs: {exc}", param="structured_outputs") from None


def check(spec: StructuredOutputsParams) -> None:
    """Refuse a spec whose grammar cannot be compiled, without a tokenizer (a command-line option, say)."""
    error = LLMatcher.validate_grammar(grammar_of(spec))
    if error:
        raise InvalidRequestError(f"structured_outputs cannot be compiled: {error}", param="structured_outputs")


def spec_key(spec: StructuredOutputsParams) -> str:
    """One key per distinct spec, however its JSON schema's keys are ordered."""
    value = spec.json if not isinstance(spec.json, str) else _parsed(spec.json)
    return json.dumps([value, spec.json_object, spec.regex, spec.choice, spec.grammar], sort_keys=True)


def _parsed(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # grammar_of reports it


def tokenizer_for(hf_tokenizer, vocab_size: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer, its vocabulary as wide as the model's logits (about a second)."""
    import llguidance.hf

    eos = eos_ids or hf_tokenizer.eos_token_id
    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)


class GrammarCache:
    """Compiled matchers by spec; `matcher` hands out a fresh copy in the grammar's start state."""

    def __init__(self, tokenizer: llguidance.LLTokenizer) -> None:
        self.tokenizer = tokenizer
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()

    def matcher(self, spec: StructuredOutputsParams) -> LLMatcher:
        key = spec_key(spec)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = LLMatcher(self.tokenizer, grammar_of(spec), log_level=0)
            if compiled.is_error():
                raise InvalidRequestError(f"structured_outputs cannot be compiled: {compiled.get_error()}",
                                          param="structured_outputs")
            self._compiled[key] = compiled
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return compiled.deep_copy()


def consume(matcher: LLMatcher, token: int) -> bool:
    """Advance matcher by a sampled token; True when the grammar is complete (nothing but EOS may follow) or the
    token broke it (only when a mask went stale), either way the sequence ends."""
    matcher.consume_token(token)
    return matcher.is_stopped() or matcher.is_error()


class Bitmasks:
    """The host side of a step's token masks: one row of 32-bit words per sampled row, -1 (all allowed) for the
    free ones. Two pinned buffers alternate, so filling one never races the device's copy of the other.

    Rows are filled one after another: on a 16-core H200 host, 64 rows took 0.8 ms that way and 4 ms through
    llguidance's thread pool (LLExecutor), whose hand-off costs more than a mask."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        words = (vocab_size + 31) // 32
        pin = device.type == "cuda"
        self._buffers = [torch.full((max_rows, words), -1, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._turn = 0

    def fill(self, matchers: list[LLMatcher | None]) -> torch.Tensor:
        """The masks of rows whose matchers are given, in order (None: a free row): a host tensor [rows, words]."""
        self._turn ^= 1
        mask = self._buffers[self._turn][: len(matchers)]
        mask.fill_(-1)
        row_bytes = mask.shape[1] * 4
        start = mask.data_ptr()
        for i, matcher in enumerate(matchers):
            if matcher is not None and not matcher.is_stopped():
                matcher.unsafe_compute_mask_ptr(start + i * row_bytes, row_bytes)
        return mask


class StructuredOutput:
    """The core's structured output: llguidance's tokenizer (built at the first constrained request, from the
    same tokenizer files the front end reads), the compiled grammars and the step's bitmasks."""

    def __init__(self, config, vocab_size: int, device: torch.device, max_rows: int) -> None:
        from transformers import AutoTokenizer

        self._hf_tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self._vocab_size = vocab_size
        self._grammars: GrammarCache | None = None
        self.bitmasks = Bitmasks(max_rows, vocab_size, device)

    def matcher(self, params) -> LLMatcher:
        if self._grammars is None:  # the EOS ids come with the requests (the front end reads them)
            self._grammars = GrammarCache(tokenizer_for(self._hf_tokenizer, self._vocab_size, params.eos_token_ids))
        return self._grammars.matcher(params.structured_outputs)
