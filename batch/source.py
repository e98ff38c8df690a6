"""Where a batch's records come from: a JSONL file, stdin (spooled to a temporary file so it can be read twice),
or a dataset; with --shard K/N, every N-th record from the K-th. Read twice: once to check the custom_ids are
unique and count the lines (before any work starts), once to run them."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from batch.inputs import Record, detect_format, read_dataset, read_jsonl


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'K/N' (1 <= K <= N) → (K, N)."""
    if text is None:
        return None
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N (e.g. 2/8), got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


@dataclass
class Source:
    records: Callable[[], Iterator[Record]]  # a fresh pass over the (sharded) records each call
    fmt: str
    cleanup: Callable[[], None] = lambda: None


def open_source(path: str | None, fmt: str, shard: tuple[int, int] | None, dataset: str | None = None,
                split: str = "train", prompt_column: str | None = None, messages_column: str | None = None) -> Source:
    if dataset is not None:
        def rows() -> Iterator[Record]:
            return read_dataset(dataset, split, prompt_column, messages_column)
        return Source(_sharded(rows, shard), "dataset")
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    if path == "-":  # stdin can be read once: keep a copy to read it twice
        spool = tempfile.NamedTemporaryFile(prefix="kvgate-batch-", suffix=".jsonl", delete=False)
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.close()
        path = spool.name
        cleanup = functools.partial(os.unlink, spool.name)
    if fmt == "auto":
        with open(path, "rb") as f:
            fmt = detect_format(line for line in f if line.strip())

    def lines() -> Iterator[Record]:
        with open(path, "rb") as f:
            yield from read_jsonl(f, fmt)

    return Source(_sharded(lines, shard), fmt, cleanup)


def _sharded(records: Callable[[], Iterator[Record]], shard: tuple[int, int] | None):
    if shard is None:
        return records
    k, n = shard
    return lambda: (r for r in records() if r.index % n == k - 1)


def count_unique(records: Iterator[Record]) -> int:
    """The number of records; a custom_id used twice is an error naming it and both lines. Only 8-byte digests
    are kept: about 100 bytes a line (1M lines: ~100 MB)."""
    seen: dict[bytes, int] = {}
    count = 0
    for record in records:
        key = hashlib.blake2b(record.custom_id.encode(), digest_size=8).digest()
        if key in seen:
            raise ValueError(f"custom_id {record.custom_id!r} is used twice (lines {seen[key] + 1} and "
                             f"{record.index + 1}); ids must be unique, so that --resume can tell lines apart")
        seen[key] = record.index
        count += 1
    return count
