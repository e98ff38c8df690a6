"""Helpers of the batch tests: input files written line by line, output lines read back, response bodies with
their per-run fields (ids, timestamps, fingerprint) left out, so that two runs can be compared."""

from __future__ import annotations

from pathlib import Path

import orjson

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_LEN = 256
LONG_PROMPT = "hello world " * 300  # far past the 256-token context of the tiny model
_VOLATILE = ("id", "created", "system_fingerprint")


def write_jsonl(path: Path, rows) -> Path:
    """Each row a dict (written as JSON) or a str (written as is, for bad lines)."""
    with open(path, "wb") as f:
        for row in rows:
            f.write((row.encode() if isinstance(row, str) else orjson.dumps(row)) + b"\n")
    return path


def request(custom_id: str, url: str, body: dict, method: str = "POST") -> dict:
    """A line of an OpenAI Batch input file."""
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def chat(custom_id: str, content: str = "hi", **fields) -> dict:
    return request(custom_id, CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], **fields})


def completion(custom_id: str, prompt: str = "the cat", **fields) -> dict:
    return request(custom_id, COMPLETIONS, {"model": "gpt-4o", "prompt": prompt, **fields})


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in Path(path).read_bytes().splitlines()]


def stable(body: dict) -> dict:
    """A response body without what differs from run to run (its id, timestamp and fingerprint)."""
    return {k: v for k, v in body.items() if k not in _VOLATILE}


def stable_line(line: dict) -> dict:
    """An OpenAI batch output line without its ids: custom_id, status, and the stable body (or error body)."""
    response = line["response"]
    body = response["body"]
    return {"custom_id": line["custom_id"], "status_code": response["status_code"],
            "body": stable(body) if response["status_code"] == 200 else body, "error": line["error"]}


def by_id(lines: list[dict]) -> dict[str, dict]:
    return {line["custom_id"]: line for line in lines}


def ok_body(line: dict) -> dict:
    """The response body of a line that succeeded."""
    assert line["error"] is None and line["response"]["status_code"] == 200, line
    return line["response"]["body"]


def text_of(line: dict) -> str:
    choice = ok_body(line)["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def error_of(line: dict, status: int) -> dict:
    """The error body of a failed line, checked to be OpenAI's shape with the given status."""
    response = line["response"]
    assert response["status_code"] == status, line
    error = response["body"]["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert line["error"] == {"code": error["code"] or error["type"], "message": error["message"]}, line
    return error


def in_process_engine(monkeypatch) -> None:
    """Engines started from now on (until monkeypatch is undone) run their core in this process."""
    import engine.client
    import engine.llm

    def start_client(config, core_class=engine.llm.EngineCore):
        return engine.client.InProcessClient(config, core_class)

    monkeypatch.setattr(engine.llm, "start_client", start_client)
