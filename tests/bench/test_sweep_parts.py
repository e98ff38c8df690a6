"""The load sweep's parts: length distributions and datasets (bench/prompts.py), arrival schedules
(bench/arrivals.py), level figures, goodput and the saturation rule (bench/levels.py), and the closed- and
open-loop runners (bench/loadgen.py) against the fake OpenAI server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics

import orjson
import pytest

from bench.arrivals import schedule
from bench.fake_openai import FakeOpenAI
from bench.levels import level_figures, saturation
from bench.loadgen import make_target, run_closed, run_open, session_for
from bench.prompts import Lengths, Prompt, cycled, from_rows, parse_lengths, read_rows, synthetic, synthetic_prompts
from bench.stream_client import Record


@pytest.fixture
def fake():
    server = FakeOpenAI(delay_s=0.002).start_thread()
    yield server
    server.stop()


def test_lengths_parse_and_draw():
    assert parse_lengths("512") == Lengths("fixed", 512)
    uniform, normal = parse_lengths("uniform:100:1024"), parse_lengths("normal:512:64")
    rng = random.Random(0)
    us = [uniform.draw(rng) for _ in range(4000)]
    assert min(us) >= 100 and max(us) <= 1024 and abs(statistics.mean(us) - 562) < 15
    ns = [normal.draw(rng) for _ in range(4000)]
    assert abs(statistics.mean(ns) - 512) < 5 and abs(statistics.stdev(ns) - 64) < 5
    assert str(uniform) == "uniform:100:1024"
    for bad in ("0", "x", "uniform:5:2", "normal:5", "poisson:1:2", "uniform:1.5:3"):
        with pytest.raises(ValueError, match="not a length"):
            parse_lengths(bad)


def test_synthetic_prompts_are_seeded_and_keep_the_old_stream():
    old = random.Random(0)  # what `kvgate bench load` always sent at a fixed length
    assert synthetic_prompts("completions", 8, 3) == [old.choices(range(1000, 5000), k=8) for _ in range(3)]
    draw = lambda seed: list(itertools.islice(synthetic("chat", parse_lengths("uniform:3:9"),  # noqa: E731
                                                        parse_lengths("uniform:5:7"), seed), 20))
    first = draw(0)
    assert [p.prompt for p in first] == [p.prompt for p in draw(0)] and first != draw(1)
    assert {len(p.prompt.split()) for p in first} <= set(range(3, 10)) and {p.max_tokens for p in first} <= {5, 6, 7}


def test_jsonl_dataset_prompts_messages_and_lengths(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hello there", "max_tokens": 7}\n\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": [5, 6, 7]}\n')
    prompts = from_rows(read_rows(str(path)), str(path), Lengths("fixed", 11), True)
    assert [p.max_tokens for p in prompts] == [7, 11, 11] and prompts[2].prompt_tokens == 3
    assert prompts[1].payload(True) == {"messages": [{"role": "user", "content": "hi"}]}
    assert prompts[0].payload(True) == {"messages": [{"role": "user", "content": "hello there"}]}
    assert prompts[1].payload(False) == {"prompt": "hi"}
    fixed = from_rows(read_rows(str(path)), str(path), Lengths("fixed", 11), False)
    assert [p.max_tokens for p in fixed] == [11, 11, 11]
    order = list(itertools.islice(cycled(prompts, 0), 6))
    assert sorted(map(id, order)) == sorted(map(id, prompts * 2))
    path.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_rows(str(path))
    with pytest.raises(ValueError, match="row 1: no prompt"):
        from_rows([{"text": "x"}], "d", Lengths("fixed", 1), True)


def test_hf_sharegpt_dataset(tmp_path):
    import datasets

    rows = {"conversations": [[{"from": "human", "value": "What is a cat?"}, {"from": "gpt", "value": "x" * 40}],
                              [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "sharegpt"))
    prompts = from_rows(read_rows(str(tmp_path / "sharegpt")), "s", Lengths("fixed", 9), True)
    assert prompts[0].messages == [{"role": "user", "content": "What is a cat?"}]
    assert prompts[0].max_tokens == 10  # the reply's 40 characters / 4, no tokenizer
    assert prompts[1].messages[0]["role"] == "system" and prompts[1].max_tokens == 9  # no reply: --max-tokens
    counted = from_rows(read_rows(str(tmp_path / "sharegpt")), "s", Lengths("fixed", 9), True, lambda t: 3)
    assert counted[0].max_tokens == 3


def test_schedule_is_seeded_with_the_mean_and_burstiness_variance():
    assert schedule(50, 1.0, 3, requests=10) == schedule(50, 1.0, 3, requests=10) != schedule(50, 1.0, 4, requests=10)
    gaps = {b: [b2 - a for a, b2 in itertools.pairwise(schedule(20, b, 0, requests=20001))] for b in (1.0, 0.25, 4)}
    for b, g in gaps.items():
        assert statistics.mean(g) == pytest.approx(1 / 20, rel=0.05)
        assert statistics.variance(g) == pytest.approx(1 / (b * 20 ** 2), rel=0.15)  # gamma: 1 / (shape * rate^2)
    assert statistics.variance(gaps[0.25]) > 3 * statistics.variance(gaps[1.0]) > 9 * statistics.variance(gaps[4])
    within = schedule(10, 1.0, 0, duration_s=30)
    assert max(within) < 30 and 240 < len(within) < 360


def _rec(start, ttft, n, gap, ok=True, usage=True):
    times = [start + ttft + i * gap for i in range(n)]
    return Record(start=start, end=times[-1] if times else start + ttft, chunk_times=times,
                  usage_output=n if usage else None, usage_prompt=4 if usage else None,
                  error_kind=None if ok else "http_500", prompt=Prompt(prompt=[1, 2, 3], prompt_tokens=3))


def test_goodput_counts_only_requests_within_both_service_levels():
    records = [_rec(0, 0.1, 11, 0.01), _rec(0, 0.1, 11, 0.08),  # within; TPOT 80 ms > 50
               _rec(0, 3.0, 11, 0.01), _rec(0, 0.2, 1, 0.0),  # TTFT 3 s > 2; one token: TTFT only
               _rec(0, 0.1, 0, 0.0, ok=False)]
    level, how = level_figures(records, mode="concurrency", concurrency=5, rate=None, burstiness=None,
                               slo_ttft_s=2.0, slo_tpot_s=0.05)
    assert how == {"usage"} and level["completed"] == 4 and level["failed"] == 1 and level["errors"] == {"http_500": 1}
    assert level["duration_s"] == pytest.approx(3.1)
    assert level["goodput_requests_per_s"] == pytest.approx(2 / 3.1)
    assert level["requests_per_s"] == pytest.approx(4 / 3.1)
    assert level["output_tokens_per_s"] == pytest.approx(34 / 3.1)
    assert level["total_tokens_per_s"] == pytest.approx((34 + 16) / 3.1)
    assert level["mean_output_tokens"] == 8.5 and level["mean_prompt_tokens"] == 4
    assert level["tpot_s"]["n"] == 3 and level["tpot_s"]["min"] == pytest.approx(0.01)
    assert level["mean_concurrency"] == pytest.approx((0.2 + 0.9 + 3.1 + 0.2 + 0.1) / 3.1)
    without = level_figures([_rec(0, 0.1, 5, 0.01, usage=False)], mode="rate", concurrency=None, rate=2.0,
                            burstiness=1.0, slo_ttft_s=2, slo_tpot_s=0.05)
    assert without[1] == {"chunks"} and without[0]["mean_output_tokens"] == 5 and without[0]["mean_prompt_tokens"] == 3


def _level(records):
    return level_figures(records, mode="rate", concurrency=None, rate=1.0, burstiness=1.0, slo_ttft_s=2.0,
                         slo_tpot_s=0.05)[0]


def test_saturation_rule():
    args = {"max_failed": 0.1, "ttft_growth": 3.0, "ttft_cap_s": 30.0, "slo_ttft_s": 2.0}
    steady = [_rec(i, 0.5, 3, 0.01) for i in range(16)]
    assert saturation(steady, _level(steady), **args) is None
    growing = [_rec(i, 0.5 + i, 3, 0.01) for i in range(16)]  # a queue building up
    assert "grows without bound" in saturation(growing, _level(growing), **args)
    small = [_rec(i, 0.001 * (1 + i), 3, 0.01) for i in range(16)]  # grows, but far below the service level
    assert saturation(small, _level(small), **args) is None
    failing = steady[:9] + [_rec(i, 0.1, 0, 0, ok=False) for i in range(2)]
    assert "2 of 11 requests failed" in saturation(failing, _level(failing), **args)
    slow = [_rec(i, 40.0, 3, 0.01) for i in range(4)]
    assert "above the cap" in saturation(slow, _level(slow), **args)


def _target(server, model="fake"):
    return make_target(server.url, "completions", model=model, api_key="k", timeout_s=10)


def _prompts(n_tokens=20):
    return synthetic("completions", Lengths("fixed", 4), Lengths("fixed", n_tokens), 0)


@pytest.mark.parametrize("users", [1, 3, 6])
def test_closed_loop_keeps_at_most_n_requests_in_flight(fake, users):
    async def go():
        async with session_for(0) as session:  # no connection limit: the users alone bound what is in flight
            return await run_closed(session, _target(fake), _prompts(), concurrency=users, requests=4 * users)

    records = asyncio.run(go())
    assert len(records) == 4 * users and all(r.ok for r in records) and sorted(r.index for r in records) == list(
        range(4 * users))
    assert fake.max_in_flight == users and fake.requests == 4 * users and fake.auth == "Bearer k"


def test_open_loop_follows_its_schedule(fake):
    rate, n = 100.0, 60

    async def go():
        async with session_for(0) as session:
            return await run_open(session, _target(fake), _prompts(5), rate=rate, burstiness=1.0, seed=7,
                                  requests=n)

    records = sorted(asyncio.run(go()), key=lambda r: r.index)
    planned = schedule(rate, 1.0, 7, requests=n)
    starts = [r.start - records[0].start for r in records]
    assert len(records) == n and all(r.ok for r in records)
    assert max(abs(a - b) for a, b in zip(starts, planned)) < 0.03  # each sent when the schedule says
    arrivals = [b - a for a, b in itertools.pairwise(fake.arrivals)]
    assert statistics.mean(arrivals) == pytest.approx(statistics.mean(itertools.starmap(
        lambda a, b: b - a, itertools.pairwise(planned))), rel=0.1)


def test_body_fields(fake):
    target = make_target(fake.url + "/v1/", "chat", model="fake", api_key=None, timeout_s=5, ignore_eos=False)
    body = orjson.loads(target.body(Prompt(prompt="hi", max_tokens=3)))
    assert target.url == fake.url + "/v1/chat/completions" and "ignore_eos" not in body
    assert body == {"model": "fake", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
                    "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
