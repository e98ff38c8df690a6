"""Logprobs in OpenAI's two shapes: chat (`content[]` of token, logprob, bytes, top_logprobs) and completions
(tokens, token_logprobs, top_logprobs, text_offset). JSON has no infinity: a -inf logprob is sent as -9999.0,
the value the specification uses for "very unlikely"."""

from __future__ import annotations

import math
import re

from engine.outputs import Logprob

UNLIKELY = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _finite(value: float) -> float:
    return value if math.isfinite(value) else UNLIKELY


def _byte_level_decoder() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character: printable Latin-1 bytes stand for themselves,
    the others for chr(256 + k) in byte order. Reversed here, it gives the raw bytes of a token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + k): b for k, b in enumerate(others)})
    return table


class TokenFormatter:
    """Text and UTF-8 bytes of single tokens, cached. A token may hold half a character: its text then shows
    U+FFFD, but its bytes are exact, so the bytes of a completion's tokens always add up to its text."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        # what decoding with skip_special_tokens leaves out: every added token marked special, not only the
        # named ones (all_special_ids misses e.g. ChatML's <|im_start|> when it is not an additional special token)
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
        self._byte_level = _byte_level_decoder() if _is_byte_level(tokenizer) else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int, skip_special: bool = True) -> tuple[str, list[int]]:
        if skip_special and token_id in self._special:
            return "", []  # not part of the text (EOS, end of turn)
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._format(token_id)
        return found

    def _format(self, token_id: int) -> tuple[str, list[int]]:
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        raw = self._tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_level is not None and raw and all(ch in self._byte_level for ch in raw):
            return text, [self._byte_level[ch] for ch in raw]
        if raw and (m := _BYTE_TOKEN.fullmatch(raw)):
            return text, [int(m.group(1), 16)]
        return text, list(text.encode())


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in type(backend.decoder).__name__ + repr(backend.decoder)


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    ranked = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    return sorted(ranked, key=lambda item: item[1].rank)


def chat_logprobs(fmt: TokenFormatter, token_ids: list[int], entries: list[dict[int, Logprob]], k: int,
                  skip_special: bool = True) -> dict:
    content = []
    for token, entry in zip(token_ids, entries):
        text, raw = fmt(token, skip_special)
        top = []
        for alt, lp in _top(entry, k):
            alt_text, alt_raw = fmt(alt, False)
            top.append({"token": alt_text, "logprob": _finite(lp.logprob), "bytes": alt_raw})
        content.append({"token": text, "logprob": _finite(entry[token].logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(fmt: TokenFormatter, token_ids: list[int], entries: list[dict[int, Logprob]], k: int,
                        offset: int, skip_special: bool = True) -> tuple[dict, int]:
    """The completions shape for these tokens, whose text starts at character `offset`; also the offset
    after them (streams continue from it)."""
    tokens, values, tops, offsets = [], [], [], []
    for token, entry in zip(token_ids, entries):
        text, _ = fmt(token, skip_special)
        tokens.append(text)
        values.append(_finite(entry[token].logprob))
        top: dict[str, float] = {}
        for alt, lp in _top(entry, k):  # two tokens may read alike ("\ufffd"): the likelier one keeps the key
            top.setdefault(fmt(alt, False)[0], _finite(lp.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def echo_logprobs(fmt: TokenFormatter, prompt_ids: list[int], entries: list[dict[int, Logprob] | None], k: int,
                  skip_special: bool = True) -> tuple[dict, int]:
    """The prompt's tokens in the completions shape, as `echo` returns them before the completion's: nothing
    predicts the first token, so its logprob and top_logprobs are null. Also the offset after them."""
    first, _ = fmt(prompt_ids[0], skip_special)
    rest, offset = completion_logprobs(fmt, prompt_ids[1:], entries[1:], k, len(first), skip_special)
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}, offset


def joined(first: dict, then: dict) -> dict:
    """Two runs of tokens in the completions shape, one after the other."""
    return {key: first[key] + then[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def prompt_logprobs_body(entries: list[dict[int, Logprob] | None] | None, k: int) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token (the first None) {token id as a string: {logprob, rank,
    decoded_token}}, the prompt token itself first, then its k most likely alternatives."""
    if entries is None:
        return None
    body: list[dict | None] = []
    for entry in entries:
        if entry is None:
            body.append(None)
            continue
        items = iter(entry.items())  # the engine's order: the prompt token, then the alternatives by rank
        token, actual = next(items)
        kept = [(token, actual), *((t, lp) for t, lp in items if lp.rank is not None and lp.rank <= k)]
        body.append({str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
                     for t, lp in kept})
    return body
