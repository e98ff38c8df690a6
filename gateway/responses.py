"""Response bodies of /v1/chat/completions and /v1/completions, built from engine outputs.

Shared by the HTTP gateway and the batch runner, so the same request gives the same body through either door.
Stream chunks are assembled from a prefix and suffix computed once per response: only the choice is encoded
per chunk, which keeps the gateway far from being what limits throughput."""

from __future__ import annotations

import orjson

from engine.outputs import CompletionOutput, RequestOutput
from gateway.logprobs import (
    TokenFormatter,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    joined,
    prompt_logprobs_body,
)
from gateway.tool_calls import ToolCalls, ToolCallStream, finish_reason

DONE = b"data: [DONE]\n\n"


def sse(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ResponseBuilder:
    """Bodies and stream chunks of one response (`chat` or `completion`), with its id, model and options."""

    def __init__(self, kind: str, response_id: str, created: int, model: str, fingerprint: str,
                 formatter: TokenFormatter, *, n: int, logprobs: int | None, skip_special: bool = True,
                 include_usage: bool = False) -> None:
        self.kind, self.id, self.created, self.model, self.fingerprint = kind, response_id, created, model, fingerprint
        self.fmt, self.n, self.logprobs, self.skip_special = formatter, n, logprobs, skip_special
        self.include_usage = include_usage
        head = {"id": response_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": created, "model": model, "system_fingerprint": fingerprint}
        self._prefix = b"data: " + orjson.dumps(head)[:-1] + b',"choices":['
        self._suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        self._text_offsets: dict[int, int] = {}  # completions logprobs: where each choice's next token starts
        self.tools: ToolCalls | None = None  # chat with tools: how the text becomes tool calls
        self._tool_streams: dict[int, ToolCallStream] = {}  # each streamed choice's parse so far
        self.prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: alternatives per prompt token

    # -- whole responses ------------------------------------------------------------------------------------------

    def response(self, outputs: list[RequestOutput], echo_prompts: list[str] | None = None) -> dict:
        """The non-streamed body for the final outputs of each prompt (one prompt for chat)."""
        choices = []
        for p, out in enumerate(outputs):
            for c in out.outputs:
                index = p * self.n + c.index
                if self.kind == "chat":
                    choices.append(self._chat_choice(index, c))
                else:
                    echo = echo_prompts[p] if echo_prompts else ""
                    choices.append(self._completion_choice(index, c, echo, out, echo_prompts is not None))
        body = {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
                "choices": choices, "usage": usage(outputs)}
        if self.kind == "chat" and self.prompt_logprobs is not None:  # vLLM puts chat's on the response
            body["prompt_logprobs"] = prompt_logprobs_body(outputs[0].prompt_logprobs, self.prompt_logprobs)
        return body

    def _chat_choice(self, index: int, c: CompletionOutput) -> dict:
        message, finish = {"role": "assistant", "content": c.text, "refusal": None}, c.finish_reason
        if self.tools is not None:
            parsed, finish = self.tools.message(c.text, finish)
            message.update(parsed)
        return {"index": index, "message": message, "logprobs": self._chat_logprobs(c), "finish_reason": finish}

    def _completion_choice(self, index: int, c: CompletionOutput, echo: str, out: RequestOutput | None = None,
                           echoed: bool = False) -> dict:
        self._text_offsets[index] = len(echo)
        logprobs = self._completion_logprobs(index, c)
        if echoed and logprobs is not None:  # the prompt's tokens first
            logprobs = joined(self._echo_logprobs(out), logprobs)
        choice = {"index": index, "text": echo + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}
        if self.prompt_logprobs is not None and out is not None:  # vLLM's, on each choice
            choice["prompt_logprobs"] = prompt_logprobs_body(out.prompt_logprobs, self.prompt_logprobs)
        return choice

    def _echo_logprobs(self, out: RequestOutput) -> dict:
        return echo_logprobs(self.fmt, out.prompt_token_ids, out.prompt_logprobs, self.logprobs, self.skip_special)[0]

    def _chat_logprobs(self, c: CompletionOutput) -> dict | None:
        if self.logprobs is None or c.logprobs is None:
            return None
        return chat_logprobs(self.fmt, c.token_ids, c.logprobs, self.logprobs, self.skip_special)

    def _completion_logprobs(self, index: int, c: CompletionOutput) -> dict | None:
        if self.logprobs is None or c.logprobs is None:
            return None
        body, self._text_offsets[index] = completion_logprobs(
            self.fmt, c.token_ids, c.logprobs, self.logprobs, self._text_offsets.get(index, 0), self.skip_special)
        return body

    # -- stream chunks ---------------------------------------------------------------------------------------------

    def _chunk(self, choice: dict) -> bytes:
        return self._prefix + orjson.dumps(choice) + self._suffix

    def role_chunk(self, index: int) -> bytes:
        """The first chat chunk of a choice: it carries the role."""
        # with tools, content stays null unless text comes: a reply that only calls tools has none
        content = None if self.tools is not None else ""
        return self._chunk({"index": index, "delta": {"role": "assistant", "content": content}, "logprobs": None,
                            "finish_reason": None})

    def echo_chunk(self, index: int, prompt: str, out: RequestOutput | None = None) -> bytes:
        """A choice's first chunk with echo: the prompt text, and with logprobs its tokens' (from out)."""
        self._text_offsets[index] = len(prompt)
        logprobs = None if out is None or self.logprobs is None else self._echo_logprobs(out)
        return self._chunk({"index": index, "text": prompt, "logprobs": logprobs, "finish_reason": None})

    def delta_chunk(self, index: int, c: CompletionOutput) -> bytes:
        """The chunk for one choice's new text, tokens and logprobs (and finish_reason on its last chunk)."""
        if self.kind == "chat":
            delta, finish = ({"content": c.text} if c.text else {}), c.finish_reason
            if self.tools is not None:
                delta, finish = self._tool_delta(index, c)
            choice = {"index": index, "delta": delta, "logprobs": self._chat_logprobs(c), "finish_reason": finish}
        else:
            choice = {"index": index, "text": c.text, "logprobs": self._completion_logprobs(index, c),
                      "finish_reason": c.finish_reason}
        return self._chunk(choice)

    def _tool_delta(self, index: int, c: CompletionOutput) -> tuple[dict, str | None]:
        stream = self._tool_streams.setdefault(index, self.tools.stream())
        final = c.finish_reason is not None
        content, calls = stream.feed(c.text, final)
        # an empty reply with no calls still ends with content "", as the whole response has it
        delta = {"content": content} if content or (final and not stream.called and not stream.content_sent) else {}
        if calls:
            delta["tool_calls"] = calls
        return delta, finish_reason(c.finish_reason, stream.called)

    def usage_chunk(self, outputs: list[RequestOutput], completion_tokens: int) -> bytes:
        return self._prefix + b'],"usage":' + orjson.dumps(usage(outputs, completion_tokens)) + b"}\n\n"


def usage(outputs: list[RequestOutput], completion_tokens: int | None = None) -> dict:
    """Token counts over every prompt of a response (the prompt counted once however many choices);
    cached_tokens is what the prefix cache supplied."""
    prompt = sum(len(out.prompt_token_ids) for out in outputs)
    if completion_tokens is None:
        completion_tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}
