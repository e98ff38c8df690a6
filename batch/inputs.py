"""Batch inputs as a stream of records, whatever the format: OpenAI Batch API JSONL, plain JSONL, or a Hugging
Face dataset. A line that cannot become a request is still a record (with its error), so the output keeps one
line per input line."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.errors import APIError, bad_request

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
FORMATS = ("auto", "openai", "jsonl")


@dataclass
class Record:
    index: int  # position in the input, from 0
    custom_id: str
    url: str = ""
    body: dict | None = None
    error: APIError | None = None  # the line is bad: this is its answer


def detect_format(lines: Iterable[bytes]) -> str:
    """openai when the first line that is a JSON object has custom_id and body; lines before it that are not
    JSON objects (a bad first line) are skipped, so they do not turn a whole OpenAI file into plain JSONL."""
    for line in lines:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return "openai" if {"custom_id", "body"} <= obj.keys() else "jsonl"
    return "jsonl"


def read_jsonl(lines: Iterable[bytes], fmt: str) -> Iterator[Record]:
    """Records of a JSONL file's lines (blank lines skipped, not counted)."""
    index = 0
    for raw in lines:
        if not raw.strip():
            continue
        yield _openai_record(index, raw) if fmt == "openai" else _plain_record(index, raw)
        index += 1


def _parse(index: int, raw: bytes) -> tuple[dict | None, Record | None]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, Record(index, f"line-{index}", error=bad_request(f"line {index + 1} is not valid JSON: {exc}",
                                                                         code="invalid_json"))
    if not isinstance(obj, dict):
        return None, Record(index, f"line-{index}", error=bad_request(f"line {index + 1} is not a JSON object"))
    return obj, None


def _openai_record(index: int, raw: bytes) -> Record:
    obj, bad = _parse(index, raw)
    if bad is not None:
        return bad
    custom_id = obj.get("custom_id")
    record = Record(index, custom_id if isinstance(custom_id, str) and custom_id else f"line-{index}")
    url, method, body = obj.get("url"), obj.get("method", "POST"), obj.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        record.error = bad_request("custom_id must be a non-empty string", "custom_id")
    elif url not in (CHAT_URL, COMPLETIONS_URL):
        record.error = APIError(404, f"{method} {url} does not exist; use {CHAT_URL} or {COMPLETIONS_URL}.",
                                param="url")
    elif method != "POST":
        record.error = APIError(405, f"{method} is not allowed on {url}.", param="method")
    elif not isinstance(body, dict):
        record.error = bad_request("body must be a JSON object", "body")
    else:
        record.url, record.body = url, body
    return record


def _plain_record(index: int, raw: bytes) -> Record:
    obj, bad = _parse(index, raw)
    if bad is not None:
        return bad
    return plain_record(index, obj)


def plain_record(index: int, obj: dict) -> Record:
    """A record from `{"prompt" or "messages", optional "id"/"custom_id", sampling fields...}`."""
    obj = dict(obj)
    given, other = obj.pop("custom_id", None), obj.pop("id", None)  # neither is a request field
    if given is None or given == "":  # a custom_id of 0 is an id, not a missing one
        given = other
    record = Record(index, str(given) if given is not None else f"line-{index}")
    if "messages" in obj:
        record.url = CHAT_URL
    elif "prompt" in obj:
        record.url = COMPLETIONS_URL
    else:
        record.error = bad_request("a line needs a prompt or messages", "prompt")
        return record
    record.body = obj
    return record


def read_dataset(name: str, split: str, prompt_column: str | None, messages_column: str | None) -> Iterator[Record]:
    """Rows of a Hugging Face dataset: a hub name (where a network is), a saved dataset directory, or a local
    json/jsonl/csv/parquet file. Streamed, so memory stays flat."""
    import datasets

    path = Path(name)
    if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json")):
        data = datasets.load_from_disk(str(path))
        data = data[split] if isinstance(data, datasets.DatasetDict) else data
    elif path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise ValueError(f"cannot read {path.suffix} files as a dataset; use json, jsonl, csv or parquet")
        data = datasets.load_dataset(builder, data_files=str(path), split=split, streaming=True)
    else:
        data = datasets.load_dataset(name, split=split, streaming=True)
    column = messages_column or prompt_column or "prompt"
    key = "messages" if messages_column else "prompt"
    for index, row in enumerate(data):
        if column not in row:
            raise ValueError(f"the dataset has no column {column!r}; its columns: {', '.join(row)}")
        given = row.get("custom_id", row.get("id"))
        yield plain_record(index, {key: row[column], **({"custom_id": given} if given is not None else {})})
