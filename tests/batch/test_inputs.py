"""`kvgate batch run` reads every input format: OpenAI Batch JSONL, plain JSONL, stdin, and Hugging Face datasets
(a jsonl, csv or parquet file, or a save_to_disk directory) with --prompt-column / --messages-column; the
format is detected, or forced with --format. At temperature 0 the same prompt gets the same text whatever
format it came in."""

from __future__ import annotations

import tempfile

import orjson
import pytest

from tests.batch.helpers import (
    by_id,
    chat,
    completion,
    error_of,
    ok_body,
    read_jsonl,
    text_of,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("deadline", "in_process_core")

GREEDY = ("--temperature", "0", "--max-tokens", "4", "--ignore-eos")
PROMPTS = ["the cat", "a dog sat"]
MESSAGES = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": "what is 2+2?"}]]


@pytest.fixture
def reference(tmp_path, batch_cli) -> dict[str, str]:
    """The texts of PROMPTS (p0, p1) and MESSAGES (m0, m1), from a plain JSONL run."""
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    rows += [{"id": f"m{i}", "messages": m} for i, m in enumerate(MESSAGES)]
    out = tmp_path / "reference.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "reference_in.jsonl", rows), "-o", out, *GREEDY)
    assert result.exit_code == 0, result.output
    return {line["custom_id"]: text_of(line) for line in read_jsonl(out)}


def test_openai_batch_file_chat_and_completions(tmp_path, batch_cli, tiny_llama_dir):
    rows = [chat("c1", max_tokens=3), completion("k1", max_tokens=2), chat("c2", content="tell me more")]
    out = tmp_path / "out.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out, "--temperature", "0", "--ignore-eos")
    assert result.exit_code == 0, result.output
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == ["c1", "k1", "c2"]
    for line in lines:
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["id"].startswith("batch_req_") and line["response"]["request_id"].startswith("req_")
    c1, k1 = ok_body(lines[0]), ok_body(lines[1])
    assert c1["object"] == "chat.completion" and c1["id"].startswith("chatcmpl-")
    assert c1["choices"][0]["message"]["role"] == "assistant" and c1["usage"]["completion_tokens"] == 3
    assert k1["object"] == "text_completion" and k1["id"].startswith("cmpl-")
    assert k1["usage"]["completion_tokens"] == 2
    assert {ok_body(line)["model"] for line in lines} == {tiny_llama_dir.name}  # "gpt-4o" served by the model
    assert "3 lines" in result.stderr and "0 failed" in result.stderr


def test_plain_jsonl_prompts_messages_ids_and_per_line_fields(tmp_path, batch_cli, reference):
    rows = [{"prompt": PROMPTS[0], "id": "p0"},
            {"messages": MESSAGES[1], "custom_id": "m1"},
            {"prompt": PROMPTS[1]},  # no id: named after its line
            {"prompt": PROMPTS[0], "id": 7, "max_tokens": 2},  # a line's own sampling fields
            {"messages": MESSAGES[0], "id": "m0", "max_completion_tokens": 6, "n": 2},
            {"prompt": PROMPTS[1], "custom_id": 0, "id": "unused"}]  # custom_id wins, even a falsy one
    out = tmp_path / "out.jsonl"
    result = batch_cli(write_jsonl(tmp_path / "in.jsonl", rows), "-o", out, *GREEDY)
    assert result.exit_code == 0, result.output
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == ["p0", "m1", "line-2", "7", "m0", "0"]
    got = by_id(lines)
    assert text_of(got["p0"]) == reference["p0"] and text_of(got["m1"]) == reference["m1"]
    assert text_of(got["line-2"]) == reference["p1"] and text_of(got["0"]) == reference["p1"]
    assert ok_body(got["p0"])["object"] == "text_completion" and ok_body(got["m1"])["object"] == "chat.completion"
    assert ok_body(got["7"])["usage"]["completion_tokens"] == 2
    m0 = ok_body(got["m0"])
    assert len(m0["choices"]) == 2 and m0["usage"]["completion_tokens"] == 12
    assert m0["choices"][0]["message"]["content"].startswith(reference["m0"])


def test_stdin_input(tmp_path, batch_cli, reference, monkeypatch):
    spool = tmp_path / "spool"  # where stdin is copied to be read twice
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    data = "".join(f'{{"id": "p{i}", "prompt": "{p}"}}\n' for i, p in enumerate(PROMPTS))
    out = tmp_path / "out.jsonl"
    result = batch_cli("-", "-o", out, *GREEDY, input=data)
    assert result.exit_code == 0, result.output
    assert {line["custom_id"]: text_of(line) for line in read_jsonl(out)} == {"p0": reference["p0"],
                                                                              "p1": reference["p1"]}
    openai = "".join(orjson.dumps(row).decode() + "\n" for row in (chat("c", max_tokens=1), chat("c")))
    result = batch_cli("-", "-o", tmp_path / "dup.jsonl", input=openai)  # detected as OpenAI; a duplicate id
    assert result.exit_code == 1 and "'c'" in result.output
    assert list(spool.iterdir()) == []  # the copy is removed, after a run and after a refusal


def test_format_is_detected_or_forced(tmp_path, batch_cli):
    openai_file = write_jsonl(tmp_path / "openai.jsonl", [completion("a"), chat("b")])
    plain_file = write_jsonl(tmp_path / "plain.jsonl", [{"custom_id": "a", "prompt": "x"}, {"prompt": "y"}])
    detected = {openai_file: ["text_completion", "chat.completion"], plain_file: ["text_completion"] * 2}
    for path, objects in detected.items():
        out = tmp_path / f"auto-{path.name}"
        result = batch_cli(path, "-o", out, *GREEDY)
        assert result.exit_code == 0, result.output
        assert [ok_body(line)["object"] for line in read_jsonl(out)] == objects
    # forced the wrong way round: every line is an error line, the run goes on
    out = tmp_path / "forced-jsonl.jsonl"
    result = batch_cli(openai_file, "-o", out, "--format", "jsonl", *GREEDY)
    assert result.exit_code == 1
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == ["a", "b"]
    assert all(error_of(line, 400)["param"] == "prompt" for line in lines)
    out = tmp_path / "forced-openai.jsonl"
    result = batch_cli(plain_file, "-o", out, "--format", "openai", *GREEDY)
    assert result.exit_code == 1
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == ["a", "line-1"]
    assert error_of(lines[0], 404)["param"] == "url" and error_of(lines[1], 400)["param"] == "custom_id"


@pytest.fixture
def dataset_files(tmp_path):
    """The same rows as a jsonl, a csv, a parquet file and a save_to_disk directory: columns id, text, chat."""
    import datasets

    rows = [{"id": f"r{i}", "text": p, "chat": m} for i, (p, m) in enumerate(zip(PROMPTS, MESSAGES))]
    files = {"jsonl": write_jsonl(tmp_path / "data.jsonl", rows)}
    data = datasets.Dataset.from_list(rows)
    files["csv"] = tmp_path / "data.csv"
    data.remove_columns("chat").to_csv(str(files["csv"]), index=False)
    files["parquet"] = tmp_path / "data.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), files["parquet"])
    except ImportError:
        data.to_parquet(str(files["parquet"]))
    files["disk"] = tmp_path / "saved"
    data.save_to_disk(str(files["disk"]))
    files["splits"] = tmp_path / "saved_splits"
    datasets.DatasetDict({"train": data.select([0]), "test": data}).save_to_disk(str(files["splits"]))
    return files


def test_datasets_from_local_files_and_saved_directory(tmp_path, batch_cli, reference, dataset_files):
    prompts = {"r0": reference["p0"], "r1": reference["p1"]}
    chats = {"r0": reference["m0"], "r1": reference["m1"]}
    runs = [("jsonl", "--prompt-column", "text", prompts), ("csv", "--prompt-column", "text", prompts),
            ("parquet", "--prompt-column", "text", prompts), ("disk", "--prompt-column", "text", prompts),
            ("jsonl", "--messages-column", "chat", chats), ("parquet", "--messages-column", "chat", chats),
            ("disk", "--messages-column", "chat", chats)]
    for kind, flag, column, expected in runs:
        out = tmp_path / f"out-{kind}-{column}.jsonl"
        result = batch_cli("--dataset", dataset_files[kind], flag, column, "-o", out, *GREEDY)
        assert result.exit_code == 0, (kind, column, result.output)
        lines = read_jsonl(out)
        assert [line["custom_id"] for line in lines] == ["r0", "r1"], (kind, column)
        assert {line["custom_id"]: text_of(line) for line in lines} == expected, (kind, column)
        assert ok_body(lines[0])["object"] == ("chat.completion" if column == "chat" else "text_completion")
    out = tmp_path / "out-split.jsonl"  # a DatasetDict directory: --split picks the split
    result = batch_cli("--dataset", dataset_files["splits"], "--split", "test", "--prompt-column", "text", "-o", out,
                       *GREEDY)
    assert result.exit_code == 0, result.output
    assert {line["custom_id"]: text_of(line) for line in read_jsonl(out)} == prompts


def test_dataset_default_prompt_column_and_a_missing_column(tmp_path, batch_cli, reference):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    result = batch_cli("--dataset", data, "-o", out, *GREEDY)
    assert result.exit_code == 0, result.output
    assert [(line["custom_id"], text_of(line)) for line in read_jsonl(out)] == [("line-0", reference["p0"]),
                                                                                ("line-1", reference["p1"])]
    out = tmp_path / "missing.jsonl"
    result = batch_cli("--dataset", data, "--prompt-column", "question", "-o", out, *GREEDY)
    assert result.exit_code != 0
    assert "'question'" in result.output and "prompt" in result.output
    assert not out.exists()


def test_input_and_dataset_are_exclusive(tmp_path, batch_cli):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "x"}])
    for args in ([data, "--dataset", data], []):
        result = batch_cli(*args, "-o", tmp_path / "out.jsonl")
        assert result.exit_code == 2 and "exactly one" in result.output
