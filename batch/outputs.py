"""Batch output lines, and the output file: appended line by line and flushed, so a run killed at any moment
loses at most the lines in flight; on resume, the custom_ids already answered are read back."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import orjson

from gateway.errors import APIError

OUTPUT_FORMATS = ("openai", "simple")


def openai_line(custom_id: str, body: dict | None, error: APIError | None) -> dict:
    """OpenAI's batch output line; a failed request carries its HTTP status and error body, as the gateway
    would have answered, and a top-level error."""
    status = 200 if error is None else error.status
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}",
                         "body": body if error is None else error.body()},
            "error": None if error is None else {"code": error.code or error.type, "message": error.message}}


def simple_line(custom_id: str, body: dict | None, error: APIError | None) -> dict:
    if error is not None:
        return {"custom_id": custom_id, "error": error.body()["error"]}
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return {"custom_id": custom_id, "text": text, "finish_reason": choice["finish_reason"], "usage": body["usage"]}


class OutputFile:
    """One JSON line per write, flushed at once (`-` is stdout)."""

    def __init__(self, path: str, append: bool) -> None:
        self.path = path
        self._file = os.fdopen(os.dup(1), "wb") if path == "-" else open(path, "ab" if append else "wb")

    def write(self, line: dict) -> None:
        self._file.write(orjson.dumps(line) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def answered_ids(path: str) -> set[str]:
    """custom_ids already in an output file (for --resume). A last line cut short by a kill is removed."""
    file = Path(path)
    if not file.exists():
        return set()
    done: set[str] = set()
    good_end = 0
    with open(file, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                done.add(orjson.loads(raw)["custom_id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                break
            good_end += len(raw)
    if good_end != file.stat().st_size:
        os.truncate(file, good_end)
    return done


def put_in_order(path: str, custom_ids) -> None:
    """Rewrite an output file (resumed: new lines were appended after old ones) in the order of custom_ids.
    Only line offsets are held in memory."""
    offsets: dict[str, int] = {}
    with open(path, "rb") as f:
        position = 0
        for raw in f:
            offsets[orjson.loads(raw)["custom_id"]] = position
            position += len(raw)
    tmp = path + ".ordered"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for custom_id in custom_ids:
            if custom_id in offsets:
                src.seek(offsets[custom_id])
                dst.write(src.readline())
    os.replace(tmp, path)
