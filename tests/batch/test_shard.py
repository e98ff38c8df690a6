"""--shard K/N runs every N-th line from the K-th; `kvgate batch merge` joins the N outputs into what one
unsharded run writes, and refuses shard outputs given out of order, incomplete or cut short."""

from __future__ import annotations

import pytest

from tests.batch.helpers import chat, completion, read_jsonl, stable_line, write_jsonl

pytestmark = pytest.mark.usefixtures("deadline", "in_process_core")

ARGS = ("--temperature", "0", "--max-tokens", "3")


@pytest.fixture
def shards(tmp_path, batch_cli):
    """The input (10 lines, one of them bad), its unsharded run's stable lines, and the 3 shard outputs."""
    rows = [chat(f"c{i}", content=f"{i} hi") if i % 2 else completion(f"k{i}", prompt=f"{i} the cat")
            for i in range(10)]
    rows[4]["body"]["temperature"] = -1
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = batch_cli(path, "-o", tmp_path / "whole.jsonl", *ARGS)
    assert result.exit_code == 1, result.output
    whole = [stable_line(line) for line in read_jsonl(tmp_path / "whole.jsonl")]
    outputs = []
    for k in (1, 2, 3):
        out = tmp_path / f"shard{k}.jsonl"
        result = batch_cli(path, "-o", out, "--shard", f"{k}/3", *ARGS)
        assert result.exit_code == (1 if k == 2 else 0), result.output  # line 4 (0-based) is in shard 2
        outputs.append(out)
    return rows, whole, outputs


def test_shards_hold_every_nth_line_and_merge_into_the_unsharded_output(tmp_path, shards, merge_cli):
    rows, whole, outputs = shards
    for k, out in enumerate(outputs):
        assert [line["custom_id"] for line in read_jsonl(out)] == [r["custom_id"] for r in rows[k::3]]
    merged = tmp_path / "merged.jsonl"
    result = merge_cli(*outputs, "-o", merged)
    assert result.exit_code == 0, result.output
    assert "10 lines from 3 shards" in result.stderr
    assert [stable_line(line) for line in read_jsonl(merged)] == whole


def test_merge_refuses_shards_out_of_order(tmp_path, shards, merge_cli):
    _, _, (s1, s2, s3) = shards  # 4, 3 and 3 lines
    for order in ((s2, s1, s3), (s3, s2, s1)):
        merged = tmp_path / "merged.jsonl"
        result = merge_cli(*order, "-o", merged)
        assert result.exit_code == 1, result.output
        assert "order 1/N ... N/N" in result.output and s1.name in result.output
        assert not merged.exists() and not (tmp_path / "merged.jsonl.partial").exists()


def test_merge_refuses_an_incomplete_or_cut_shard(tmp_path, shards, merge_cli):
    _, _, (s1, s2, s3) = shards
    lines = s2.read_bytes().splitlines(keepends=True)
    short = tmp_path / "short2.jsonl"
    short.write_bytes(b"".join(lines[:-1]))  # shard 2 lost its last line: shard 3 is longer
    merged = tmp_path / "merged.jsonl"
    result = merge_cli(s1, short, s3, "-o", merged)
    assert result.exit_code == 1 and "complete" in result.output and s3.name in result.output, result.output
    assert not merged.exists()

    cut = tmp_path / "cut2.jsonl"
    cut.write_bytes(b"".join(lines[:-1]) + lines[-1][:20])  # killed mid-line
    result = merge_cli(s1, cut, s3, "-o", merged)
    assert result.exit_code == 1 and "cut line" in result.output and "--resume" in result.output, result.output
    assert not merged.exists() and list(tmp_path.glob("merged*")) == []

    result = merge_cli(s1, tmp_path / "missing.jsonl", s3, "-o", merged)
    assert result.exit_code == 1 and "missing.jsonl" in result.output
