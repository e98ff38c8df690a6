"""IncrementalDetokenizer: streamed text equals tokenizer.decode, never shows half a character, and stop strings
match across token boundaries with only the text that could still become one held back."""

from __future__ import annotations

import random
import time

import pytest

from engine.detokenizer import IncrementalDetokenizer, NullDetokenizer
from engine.sampling_params import SamplingParams

FRAGMENTS = [" The capital of France is Paris.", " hello", " world", "héllo wörld", " 日本語のテキスト",
             "🙂", "🚀🚀", " café", "\n", " 123", " naïve", " straße", "!", " the quick brown fox"]


class SlowTokenizer:
    """Only `decode`, like a slow (pure Python) tokenizer: forces the prefix/read-offset fallback."""

    def __init__(self, tok):
        self._tok = tok

    def decode(self, ids, skip_special_tokens=False):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(params=["fast", "slow"])
def tok(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "fast" else SlowTokenizer(tiny_tokenizer)


def hf(tok):
    return getattr(tok, "_tok", tok)


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 8)))


def stream(tok, ids, prompt=(), chunks=(1,), rng=None, **kw):
    """Feed `ids` in chunks; return (detokenizer, output_text after each call, stop string returned)."""
    d = IncrementalDetokenizer(tok, list(prompt), **kw)
    shown, i = [], 0
    while i < len(ids):
        n = rng.choice(chunks) if rng else chunks[0]
        stop = d.add_tokens(ids[i : i + n])
        shown.append(d.output_text)
        i += n
        if stop is not None:
            return d, shown, stop
    return d, shown, None


def assert_streamed_well(shown):
    for before, after in zip(shown, shown[1:]):
        assert after.startswith(before)  # text once shown is never taken back
    assert all("\ufffd" not in s for s in shown)


def test_roundtrip_valid_text(tok):
    rng = random.Random(0)
    specials = [hf(tok).convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
    for _ in range(150):
        ids = hf(tok).encode(random_text(rng), add_special_tokens=False)
        if rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        d, shown, _ = stream(tok, ids, chunks=(1, 1, 2, 3), rng=rng)
        assert_streamed_well(shown)
        assert d.finish() == hf(tok).decode(ids, skip_special_tokens=True)
        assert len(d.token_texts) == len(ids)


def test_random_ids(tok):
    # Random ids make invalid UTF-8 (stray continuation bytes): the text still matches decode, except that an
    # incomplete character at the very end is not shown.
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(len(hf(tok))) for _ in range(rng.randint(1, 30))]
        d, shown, _ = stream(tok, ids)
        assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))
        assert d.finish() == hf(tok).decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_sequence_ending_mid_character(tok):
    ids = hf(tok).encode("ab 日本語🙂 x", add_special_tokens=False)
    for n in range(1, len(ids) + 1):
        d, shown, _ = stream(tok, ids[:n])
        assert_streamed_well(shown + [d.finish()])
        assert d.finish() == hf(tok).decode(ids[:n]).rstrip("\ufffd")


def test_special_tokens(tok):
    hello, end = hf(tok).encode(" hello"), hf(tok).convert_tokens_to_ids("<|im_end|>")
    d, _, _ = stream(tok, hello + [end] + hello)
    assert d.finish() == " hello hello"
    d, _, _ = stream(tok, hello + [end] + hello, skip_special_tokens=False)
    assert d.finish() == " hello<|im_end|> hello"


def test_token_texts(tok):
    ids = hf(tok).encode(" hi 🙂", add_special_tokens=False) + [hf(tok).convert_tokens_to_ids("<|im_end|>")]
    d, _, _ = stream(tok, ids, chunks=(2,))
    assert d.token_texts == [hf(tok).decode([i]) for i in ids]
    assert "\ufffd" in d.token_texts[-2]  # the emoji's last byte, alone
    assert d.token_texts[-1] == d.decode_token(ids[-1]) == "<|im_end|>"
    assert d.decode_token(550) == ""  # an id past the tokenizer (qwen2's padded vocab): nothing, no error


def test_prompt_is_context_not_output(tok):
    prompt = hf(tok).encode("The capital of France is")
    gen = hf(tok).encode(" Paris. 日本")
    d, _, _ = stream(tok, gen, prompt=prompt)
    assert d.finish() == " Paris. 日本"
    # A prompt ending in half a character: its completion must not re-emit prompt text.
    ids = hf(tok).encode("abc 日本")
    gen = ids[-2:] + hf(tok).encode(" ok")
    d, shown, _ = stream(tok, gen, prompt=ids[:-2])
    assert d.finish() == hf(tok).decode(gen) == "\ufffd\ufffd ok"  # what the model made: stray bytes


def _span_tokens(tok, text, stop):
    """Token ids of `text` and check `stop` spans at least 3 tokens (no pair of tokens contains it)."""
    ids = hf(tok).encode(text, add_special_tokens=False)
    pieces = [hf(tok).decode([i]) for i in ids]
    assert not any(stop in a + b for a, b in zip(pieces, pieces[1:]))
    return ids


@pytest.mark.parametrize("include", [False, True])
def test_stop_across_tokens(tok, include):
    text, stop = "The capital of France is Paris.", "ce is Pa"
    ids = _span_tokens(tok, text, stop)
    d, shown, matched = stream(tok, ids, stop=[stop, "zzz"], include_stop_str_in_output=include)
    assert matched == stop and d.stop_str == stop
    expected = text[: text.index(stop) + (len(stop) if include else 0)]
    assert d.output_text == d.finish() == expected
    assert_streamed_well(shown)
    if not include:
        assert "The capital of Fran" in shown and not any("France" in s for s in shown)  # "ce" held back
    assert d.add_tokens(hf(tok).encode(" more")) is None and d.output_text == expected


def test_stop_inside_multibyte_text(tok):
    text = "héllo 日本語のテキスト 🙂🚀 end"
    ids = hf(tok).encode(text, add_special_tokens=False)
    for stop in ["本語", "🚀", "é", "語の"]:
        for include in (False, True):
            d, shown, matched = stream(tok, ids, stop=[stop, "🙂🚀 x"], include_stop_str_in_output=include)
            assert matched == stop
            assert d.finish() == text[: text.index(stop) + (len(stop) if include else 0)]
            assert_streamed_well(shown)


def test_held_back_text_released_by_finish(tok):
    ids = hf(tok).encode("The capital of France is Par")
    d, shown, matched = stream(tok, ids, stop=[" Paris!"])
    assert matched is None
    assert shown[-1] == "The capital of France is"  # " Par" may still become " Paris!"
    assert d.finish() == d.output_text == "The capital of France is Par"


def test_no_delay_unless_prefix_of_stop(tok):
    ids = hf(tok).encode(" The quick brown fox 日本 jumps")
    d = IncrementalDetokenizer(tok, [], stop=["QQ", "\n\n"])
    for n, t in enumerate(ids, 1):
        d.add_tokens([t])
        assert d.output_text == hf(tok).decode(ids[:n]).rstrip("\ufffd")


def test_earliest_match_wins(tok):
    ids = hf(tok).encode("The capital of France is Paris.")
    d = IncrementalDetokenizer(tok, [], stop=["Paris", "capital", "of France"])
    assert d.add_tokens(ids) == "capital"  # all in one step: the match that starts first
    assert d.output_text == "The "


def test_stop_strings_against_reference(tok):
    # Reference: after each token, the first decoded prefix containing a stop string stops, cut at its
    # earliest match; before that, the shown text is everything except the longest tail that is a proper
    # prefix of a stop string.
    rng = random.Random(2)
    for _ in range(60):
        text = random_text(rng)
        ids = hf(tok).encode(text, add_special_tokens=False)
        stops = []
        for _ in range(rng.randint(1, 3)):
            a = rng.randrange(len(text))
            stops.append(text[a : a + rng.randint(1, 6)])
        stops.append("never-there")
        include = rng.random() < 0.5
        d = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
        for n in range(1, len(ids) + 1):
            matched = d.add_tokens([ids[n - 1]])
            so_far = hf(tok).decode(ids[:n]).rstrip("\ufffd")
            hits = [(so_far.find(s), len(s), s) for s in stops if s in so_far]
            if hits:
                i, length, s = min(hits)
                assert matched == s
                assert d.output_text == so_far[: i + (length if include else 0)]
                break
            assert matched is None
            hold = 0 if include else max([k for s in stops for k in range(1, len(s)) if so_far.endswith(s[:k])],
                                         default=0)
            assert d.output_text == so_far[: len(so_far) - hold]


def test_cost_per_token_is_constant(tiny_tokenizer):
    ids = tiny_tokenizer.encode(" The capital of France is Paris. 日本語 🙂" * 200)
    d = IncrementalDetokenizer(tiny_tokenizer, [], stop=["never seen", "Paris!"])
    t0 = time.perf_counter()
    for t in ids:
        d.add_tokens([t])
        d.output_text
    assert time.perf_counter() - t0 < 2.0  # a few microseconds a token; quadratic work would take far longer
    assert d.finish() == tiny_tokenizer.decode(ids)


def test_ids_past_the_tokenizers_vocabulary_decode_to_nothing(tok, tiny_tokenizer):
    """A model whose vocabulary is larger than its tokenizer's (a shape preset over a small real tokenizer) may
    sample ids the tokenizer does not know: they add no text and crash nothing."""
    known = tiny_tokenizer.encode(" hello world", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [700, *known], stop=["never seen"])
    for t in known:
        d.add_tokens([t, 600])
    d.add_tokens([151935, 99999])
    assert d.finish() == tiny_tokenizer.decode(known) and d.decode_token(600) == ""


def test_without_detokenize_there_is_no_text():
    d = NullDetokenizer()
    assert d.add_tokens([1, 2, 3]) is None and d.output_text == "" and d.decode_token(1) is None
    assert d.finish() == "" and d.finished
    with pytest.raises(ValueError, match="stop strings need detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)


@pytest.mark.slow
def test_real_tokenizer_smollm2():
    """The embedded default's tokenizer (converted once into the kvgate cache)."""
    from transformers import AutoTokenizer

    from engine.model_source import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    rng = random.Random(3)
    for _ in range(100):
        ids = tok.encode(random_text(rng) + "<|im_end|>", add_special_tokens=False)
        d, shown, _ = stream(tok, ids, chunks=(1, 2), rng=rng)
        assert_streamed_well(shown)
        assert d.finish() == tok.decode(ids, skip_special_tokens=True)
    for _ in range(100):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 30))]
        d, shown, _ = stream(tok, ids)
        assert d.finish() == tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    # " ‡" is [" " + 2 bytes of "‡", its last byte]: cut after the first, the space is still released at the end.
    ids = tok.encode("x ‡ y", add_special_tokens=False)
    assert tok.decode(ids[:2]) == "x \ufffd"
    for t in (tok, SlowTokenizer(tok)):
        for n in range(1, len(ids) + 1):
            d, _, _ = stream(t, ids[:n])
            assert d.finish() == tok.decode(ids[:n]).rstrip("\ufffd")
