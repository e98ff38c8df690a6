"""Turn what a user submits (text, token ids, chat messages) into a validated engine request.

Every check happens here, at submit time, so a bad request fails alone with a precise error and the engine
never sees it.
"""

from __future__ import annotations

import copy
import functools

from engine.errors import ContextTooLongError, InvalidRequestError
from engine.protocol import EngineInfo
from engine.sampling_params import SamplingParams

Prompt = str | list[int]
_SEED_SPAN = 2**64


def eos_token_ids(tokenizer, generation_config) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


class InputProcessor:
    def __init__(self, tokenizer, info: EngineInfo, eos_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.eos_ids = eos_ids
        self.max_pool_tokens = info.num_kv_blocks * info.block_size

    @functools.cached_property
    def grammars(self):
        """Structured output's compiled grammars, made at the first request that has one."""
        from engine.structured_output import GrammarCache, tokenizer_for

        return GrammarCache(tokenizer_for(self.tokenizer, self.info.vocab_size, self.eos_ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list", param="messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; send a plain prompt", param="messages")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as exc:  # the template itself rejects the conversation (roles, order)
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc

    def tokenize(self, prompt: Prompt, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids), checking ids lie inside the vocabulary: the engine trusts them."""
        text = None
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            text, prompt = prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        elif not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string or list of token ids", param="prompt")
        vocab = self.info.vocab_size
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise InvalidRequestError(f"prompt token id {token!r} is outside the vocabulary [0, {vocab})",
                                          param="prompt")  # a tokenizer larger than the model's vocabulary too
        return (text if isinstance(text, str) else None), list(prompt)

    def prepare_params(self, prompt_ids: list[int], params: SamplingParams) -> list[SamplingParams]:
        """The params of each of the request's n completions, completed for this prompt: n=1, its own seed,
        EOS ids filled in, max_tokens bounded by the context. Copies, never re-validated: params was checked
        when it was built, and nothing set here can make it invalid."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"expected SamplingParams, got {type(params).__name__}")
        n_prompt, limit = len(prompt_ids), self.info.max_model_len
        if n_prompt >= limit:
            raise ContextTooLongError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has {n_prompt} "
                f"tokens, leaving no room for the completion.", param="prompt")
        if params.max_tokens is not None and n_prompt + params.max_tokens > limit:
            raise ContextTooLongError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the prompt, {params.max_tokens} in the "
                f"completion). Please reduce the prompt or max_tokens.", param="max_tokens")
        if params.structured_outputs is not None:
            self.grammars.matcher(params.structured_outputs)  # compiles it (once): a bad grammar fails here
        for token in params.logit_bias or {}:
            if token >= self.info.vocab_size:
                raise InvalidRequestError(f"logit_bias token id {token} is outside the vocabulary", "logit_bias")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(limit, self.max_pool_tokens) - n_prompt)
        needed = n_prompt + max_tokens
        if needed > self.max_pool_tokens:
            raise ContextTooLongError(
                f"the request needs up to {needed} tokens of KV cache but the whole pool holds "
                f"{self.max_pool_tokens} ({self.info.num_kv_blocks} blocks); lower max_tokens or grow the pool",
                param="max_tokens")
        children = []
        for i in range(params.n):
            child = copy.copy(params)
            child.n, child.max_tokens, child.eos_token_ids = 1, max_tokens, self.eos_ids
            # each completion draws from its own seed (seed + index; torch reads seeds modulo 2**64)
            child.seed = None if params.seed is None else (params.seed + i) % _SEED_SPAN
            children.append(child)
        return children
