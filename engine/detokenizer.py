"""Incremental detokenization of one sequence, with stop strings.

The front end calls `add_tokens` once per engine step with the sequence's new token ids. Decoding and the stop
string search cost per call is proportional to the new tokens (plus a few tokens of context), never to the
length of the text so far:

- text is decoded by `tokenizers.decoders.DecodeStream` on fast tokenizers (it buffers tokens until they form
  whole UTF-8 characters), or by the classic prefix/read-offset window for slow ones; either way nothing ending
  in half a character is ever emitted;
- stop strings are searched only in the text that could contain a new match, and a tail that could still grow
  into a stop string is held back from `output_text` until it can't (or until `finish`).
"""

from __future__ import annotations

try:
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - tokenizers is a dependency; DecodeStream needs tokenizers >= 0.21
    _RustTokenizer = DecodeStream = None

# Prompt tokens decoded as context before the first generated token, so that decoders which drop a leading
# space at the start of a text (SentencePiece "▁") still produce it for the first generated word.
_PROMPT_CONTEXT = 5


class _WindowDecoder:
    """Prefix/read-offset incremental decoding for tokenizers without DecodeStream (slow tokenizers).

    Decodes ids[prefix:] and emits what goes past the text of ids[prefix:read], unless it ends in U+FFFD (an
    incomplete character, which more tokens may complete)."""

    def __init__(self, tokenizer, context: list[int], skip_special_tokens: bool):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids = list(context)
        self._prefix, self._read = 0, len(self._ids)

    def _new_text(self) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        text = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        return text[len(prefix_text) :] if len(text) > len(prefix_text) else ""

    def step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        new = self._new_text()
        if not new or new.endswith("\ufffd"):
            return None
        del self._ids[: self._prefix]  # keep only the window: memory and work stay O(1)
        self._prefix, self._read = self._read - self._prefix, len(self._ids)
        return new

    def flush(self) -> str:
        """Text of the tokens still waiting for a character to complete, minus the incomplete end."""
        return self._new_text().rstrip("\ufffd")


class _StreamDecoder:
    """DecodeStream over the Rust tokenizer, restarted without context if it ever rejects a token."""

    def __init__(self, backend, context: list[int], skip_special_tokens: bool):
        self._backend, self._skip = backend, skip_special_tokens
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens) if context else \
            DecodeStream(skip_special_tokens=skip_special_tokens)
        # Mirrors of the stream's state, for flush(): the tokens of the last emitted chunk (its decoding
        # context) and the tokens stepped since (waiting for a character to complete).
        self._last, self._pending = list(context), []

    def step(self, token_id: int) -> str | None:
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:  # e.g. InvalidPrefix from an unusual decoder: losing context beats failing the request
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            self._last, self._pending = [], []
            piece = self._stream.step(self._backend, token_id)
        self._pending.append(token_id)
        if piece is not None:
            self._last, self._pending = self._pending, []
        return piece

    def flush(self) -> str:
        """Text of the tokens still waiting for a character to complete, minus the incomplete end."""
        if not self._pending:
            return ""
        prefix_text = self._backend.decode(self._last, skip_special_tokens=self._skip)
        text = self._backend.decode(self._last + self._pending, skip_special_tokens=self._skip)
        return text[len(prefix_text) :].rstrip("\ufffd") if text.startswith(prefix_text) else ""


def _backend_of(tokenizer):
    """The Rust `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the tokenizer itself), if any."""
    if _RustTokenizer is None or DecodeStream is None:
        return None
    if isinstance(tokenizer, _RustTokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, _RustTokenizer) else None


class IncrementalDetokenizer:
    """The text of one generated sequence, built token by token (see the module docstring).

    `token_texts[i]` is generated token i decoded alone (for logprobs); `stop_str` is the stop string that
    matched, if any."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: list[str] | tuple = (), include_stop_str_in_output: bool = False):
        self._backend = _backend_of(tokenizer)
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if context and self._decode(context).endswith("\ufffd"):
            context = []  # prompt ends in half a character: its completion would be re-emitted as output
        if self._backend is not None:
            self._decoder = _StreamDecoder(self._backend, context, skip_special_tokens)
        else:
            self._decoder = _WindowDecoder(tokenizer, context, skip_special_tokens)

        if isinstance(stop, str):
            stop = [stop]
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        self._max_stop = max(map(len, self._stop), default=0)
        # Proper prefixes of the stop strings: a text tail equal to one may still become a stop string.
        self._stop_prefixes = {s[:i] for s in self._stop for i in range(1, len(s))}

        self._text = ""  # all decoded text (cut at a stop string once one matched)
        self._safe = 0  # length of the prefix of _text that may be shown
        self._token_ids: list[int] = []
        self.stop_str: str | None = None  # the stop string that matched
        self.finished = False

    def _decode(self, ids: list[int], skip_special_tokens: bool | None = None) -> str:
        skip = self._skip if skip_special_tokens is None else skip_special_tokens
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip)
        return self._tokenizer.decode(ids, skip_special_tokens=skip)

    @property
    def token_texts(self) -> list[str]:
        """Each generated token decoded alone; computed on demand, off the per-token path."""
        return [self.decode_token(t) for t in self._token_ids]

    def decode_token(self, token_id: int) -> str:
        """One token decoded alone, special tokens included (half a character comes out as U+FFFD)."""
        return self._decode([token_id], skip_special_tokens=False)

    def add_tokens(self, token_ids: list[int], check_stop: bool = True) -> str | None:
        """Append generated tokens; return the stop string that matched, if one did (the caller then finishes
        the sequence). Tokens added after a stop string or after `finish` are ignored. With check_stop False
        (before min_tokens, as vLLM does) no stop string can match in this text."""
        if self.finished:
            return None
        pieces = []
        for t in token_ids:
            self._token_ids.append(t)
            piece = self._decoder.step(t)
            if piece:
                pieces.append(piece)
        return self._append("".join(pieces), check_stop)

    def _append(self, new: str, check_stop: bool = True) -> str | None:
        if not new:
            return None
        start = len(self._text)
        self._text += new
        if not self._stop or not check_stop:
            self._safe = len(self._text)
            return None

        # A new match must end in the new text, so it starts at most max_stop - 1 characters before it.
        search_from = max(0, start - self._max_stop + 1)
        best = None
        for s in self._stop:
            i = self._text.find(s, search_from)
            if i >= 0 and (best is None or (i, len(s)) < (best[0], len(best[1]))):
                best = (i, s)
        if best is not None:
            i, s = best
            self._text = self._text[: i + len(s) if self._include_stop else i]
            self._safe = len(self._text)
            self.stop_str, self.finished = s, True
            return s

        # Hold back the longest tail that is a prefix of a stop string. Not needed when the stop string is
        # included in the output: then a match only ever appends, it never takes back text already shown.
        hold = 0
        if not self._include_stop:
            for k in range(min(self._max_stop - 1, len(self._text)), 0, -1):
                if self._text[-k:] in self._stop_prefixes:
                    hold = k
                    break
        self._safe = len(self._text) - hold
        return None

    @property
    def output_text(self) -> str:
        """All text that is safe to show now: whole characters only, no tail that may become a stop string."""
        return self._text if self._safe == len(self._text) else self._text[: self._safe]

    def finish(self) -> str:
        """End of the sequence for another reason (length, eos): release held-back text; the final text.
        Of the tokens still waiting for a character to complete, the incomplete end is dropped."""
        if not self.finished:
            self._append(self._decoder.flush())  # may still complete a stop string
            self.finished = True
        self._safe = len(self._text)
        return self._text


class NullDetokenizer:
    """detokenize=False: the sequence keeps its token ids and no text; nothing is decoded, no stop string can
    match (SamplingParams refuses stop strings without detokenize), logprobs carry no decoded tokens."""

    stop_str = None
    output_text = ""

    def __init__(self) -> None:
        self.finished = False

    def add_tokens(self, token_ids: list[int], check_stop: bool = True) -> None:
        return None

    def decode_token(self, token_id: int) -> None:
        return None

    def finish(self) -> str:
        self.finished = True
        return ""
