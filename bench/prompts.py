"""What a load test sends: synthetic prompts of drawn lengths, or prompts read from a dataset.

Lengths are a fixed number or a distribution: `512`, `uniform:100:1024` (integers, both ends included),
`normal:512:64` (rounded, at least 1). Synthetic completions prompts are random token ids in [1000, 5000), chat
prompts random common words (about one token each); the token stream of a seed is the one `kvgate bench load`
always drew, so fixed lengths give the very prompts of earlier runs.

Datasets: a JSONL file of `{"prompt": ...}` or `{"messages": [...]}` lines (optionally `max_tokens`), or a Hugging
Face dataset (a directory saved with `save_to_disk`, or a data file `datasets` reads: .json/.jsonl/.parquet/.csv)
of rows with `conversations` (ShareGPT: `[{"from": "human", "value": ...}, {"from": "gpt", ...}]`), `messages`
or `prompt`. A ShareGPT row's first reply gives its output length (in tokens with a tokenizer, else characters/4).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import orjson

_WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "red", "big", "house", "river", "old")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


@dataclass(frozen=True)
class Lengths:
    """A length distribution: fixed (a), uniform in [a, b], or normal with mean a and deviation b."""
    kind: str
    a: float
    b: float = 0.0

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def __str__(self) -> str:
        return str(int(self.a)) if self.kind == "fixed" else f"{self.kind}:{self.a:g}:{self.b:g}"


def parse_lengths(text: str) -> Lengths:
    """`512`, `uniform:100:1024` or `normal:512:64`; ValueError with the accepted forms otherwise."""
    forms = "a positive integer, uniform:MIN:MAX or normal:MEAN:STD"
    parts = str(text).strip().split(":")
    try:
        if len(parts) == 1:
            lengths = Lengths("fixed", int(parts[0]))
        elif len(parts) == 3 and parts[0] in ("uniform", "normal"):
            lengths = Lengths(parts[0], float(parts[1]), float(parts[2]))
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"{text!r} is not a length: expected {forms}") from None
    if lengths.a < 1 or (lengths.kind == "uniform" and (lengths.b < lengths.a or lengths.a != int(lengths.a)
                                                          or lengths.b != int(lengths.b))) \
            or (lengths.kind == "normal" and lengths.b < 0):
        raise ValueError(f"{text!r} is not a length: expected {forms}, at least 1 (uniform: integers, MIN <= MAX)")
    return lengths


@dataclass(slots=True)
class Prompt:
    """One request's input: `prompt` (text or token ids) or `messages`; its output length; its prompt length where
    known without the server (token ids)."""
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int = 256
    prompt_tokens: int | None = None

    def payload(self, chat: bool) -> dict:
        if chat:
            if self.messages is not None:
                return {"messages": self.messages}
            text = self.prompt if isinstance(self.prompt, str) else " ".join(map(str, self.prompt))
            return {"messages": [{"role": "user", "content": text}]}
        if self.prompt is not None:
            return {"prompt": self.prompt}
        return {"prompt": "\n\n".join(str(m.get("content", "")) for m in self.messages)}

    def text(self) -> str | list[int]:
        """The prompt as a tokenizer would count it: token ids, or the text (chat: the contents joined)."""
        if self.messages is not None:
            return "\n".join(str(m.get("content", "")) for m in self.messages)
        return self.prompt


def synthetic(endpoint: str, prompt_lengths: Lengths, output_lengths: Lengths, seed: int = 0):
    """An endless stream of Prompts, the same for the same seed. Token ids (completions) or words (chat) come
    from one stream seeded `seed`, lengths from another, so a fixed length leaves the token stream as it was."""
    tokens, lengths = random.Random(seed), random.Random(f"lengths-{seed}")
    for _ in itertools.count():
        n, out = prompt_lengths.draw(lengths), output_lengths.draw(lengths)
        if endpoint == "chat":
            yield Prompt(prompt=" ".join(tokens.choices(_WORDS, k=n)), max_tokens=out)
        else:
            yield Prompt(prompt=tokens.choices(range(1000, 5000), k=n), max_tokens=out, prompt_tokens=n)


def synthetic_prompts(endpoint: str, prompt_tokens: int, n: int, seed: int = 0) -> list:
    """The first n prompts (text or ids) of `synthetic` at a fixed length: what `kvgate bench load` sends."""
    stream = synthetic(endpoint, Lengths("fixed", prompt_tokens), Lengths("fixed", 1), seed)
    return [p.prompt for p in itertools.islice(stream, n)]


def _messages(row: dict) -> tuple[list[dict] | None, str | None]:
    """(the messages up to the first reply, the first reply's text) of a ShareGPT or chat row."""
    turns = row.get("conversations") or row.get("conversation")
    if turns is not None:
        turns = [{"role": _ROLES.get(str(t.get("from", t.get("role", ""))).lower(), "user"),
                  "content": t.get("value", t.get("content", ""))} for t in turns]
    else:
        turns = row.get("messages")
    if not turns:
        return None, None
    for i, turn in enumerate(turns):
        if turn.get("role") == "assistant" and i > 0:
            return turns[:i], str(turn.get("content") or "")
    return list(turns), None


def read_rows(path: str) -> list[dict]:
    """Rows of a JSONL file, or of a Hugging Face dataset (saved directory or data file)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"dataset {path!r}: no such file or directory")
    if p.is_file() and p.suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(p.read_bytes().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"dataset {path!r}, line {number}: not JSON ({exc})") from None
        return rows
    import datasets

    try:
        if p.is_dir():
            data = datasets.load_from_disk(str(p))
        else:
            kind = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(p.suffix)
            if kind is None:
                raise ValueError(f"dataset {path!r}: expected .jsonl, .json, .parquet, .csv or a saved dataset")
            data = datasets.load_dataset(kind, data_files=str(p), split="train")
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise ValueError(f"dataset {path!r}: not a dataset datasets can read ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    return list(data)


def from_rows(rows: list[dict], path: str, output_lengths: Lengths, use_data_lengths: bool,
              count_tokens=None) -> list[Prompt]:
    """Prompts of dataset rows; output lengths from the data (a row's max_tokens, a ShareGPT reply's length)
    where `use_data_lengths` and the row has one, else drawn from `output_lengths` (seeded)."""
    rng, prompts = random.Random("dataset-lengths"), []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"dataset {path!r}, row {number}: expected an object")
        out = output_lengths.draw(rng)
        if "prompt" in row and row["prompt"] is not None:
            prompt = Prompt(prompt=row["prompt"], max_tokens=out)
        else:
            messages, reply = _messages(row)
            if not messages:
                raise ValueError(f"dataset {path!r}, row {number}: no prompt, messages or conversations")
            prompt = Prompt(messages=messages, max_tokens=out)
            if use_data_lengths and reply:
                prompt.max_tokens = max(1, count_tokens(reply) if count_tokens else len(reply) // 4)
        if use_data_lengths and row.get("max_tokens"):
            prompt.max_tokens = int(row["max_tokens"])
        if isinstance(prompt.prompt, list):
            prompt.prompt_tokens = len(prompt.prompt)
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"dataset {path!r} has no rows")
    return prompts


def cycled(prompts: list[Prompt], seed: int = 0):
    """The dataset's prompts in a seeded order, again and again (a fresh order each pass)."""
    rng = random.Random(seed)
    while True:
        order = list(prompts)
        rng.shuffle(order)
        yield from order
