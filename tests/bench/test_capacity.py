"""`kvgate capacity`: the arithmetic against cases worked by hand, the interpolation between measured levels, the
reverse, the token view, the simulation against the closed form, each bad input's message and exit code, and
the outputs (JSON fields, the charts' points, the HTML page in chromium)."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import capacity as cap
from bench import capacity_fleet as fl
from bench import charts
from bench.capacity_command import capacity
from bench.capacity_fleet import duration_curve
from bench.capacity_sim import interpolate, simulate
from tests.bench.interrupt import interrupt_second_level
from tests.browser import Browser

SWEEP = Path(__file__).parent / "data" / "sweep-example.json"
PER_PERSON = 0.1 * 20 / 3600  # the default active share and requests an hour: requests/s per person


def levels():
    return json.loads(SWEEP.read_text())["levels"]


def run(*args):
    result = CliRunner().invoke(capacity, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def write(tmp_path, doc, name="sweep.json") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


# ---- the arithmetic, worked by hand ------------------------------------------------------------------------


def test_the_organisation_worked_by_hand():
    # 5000 people × 10% active × 20 requests an hour = 10,000 requests an hour = 2.78 requests/s
    rate = cap.arrival_rate(5000, 0.1, 20)
    assert rate == pytest.approx(10_000 / 3600) == pytest.approx(2.7778, abs=1e-4)
    # W = 12 s -> L = 33.3; the Poisson 0.99 quantile of 33.3 is 47; 30 a replica -> 2 replicas + 1 = 3 GPUs
    plan = fl.fleet(rate, 12.0, 30.0, 0.99, 1, 1)
    assert plan["mean_concurrency"] == pytest.approx(33.333, abs=1e-3)
    assert plan["peak"] == 47
    assert (plan["serving_replicas"], plan["replicas"], plan["gpus"]) == (2, 3, 3)
    assert fl.fleet(rate, 12.0, 30.0, 0.99, 1, 2)["gpus"] == 6  # tensor-parallel 2: two GPUs a replica
    assert fl.fleet(rate, 12.0, 30.0, 0.99, 0, 1)["gpus"] == 2  # no reserve
    assert fl.fleet(rate, 12.0, 50.0, 0.99, 1, 1)["replicas"] == 2  # 47 fit on one replica of 50


def test_poisson_quantile_is_the_exact_inverse_cdf():
    # mu = 1: P(X <= 3) = e^-1 (1 + 1 + 1/2 + 1/6) = 0.9810, P(X <= 4) = 0.9963
    assert cap.poisson_quantile(1.0, 0.98) == 3 and cap.poisson_quantile(1.0, 0.99) == 4
    assert cap.poisson_quantile(1.0, 0.5) == 1 and cap.poisson_quantile(0.0, 0.99) == 0
    for mu in (0.3, 7.5, 33.3, 250.0):
        cdf, k = 0.0, 0
        while True:
            cdf += math.exp(k * math.log(mu) - mu - math.lgamma(k + 1))
            if cdf >= 0.99:
                break
            k += 1
        assert cap.poisson_quantile(mu, 0.99) == k
    big = cap.poisson_quantile(1e6, 0.99)  # normal approximation: mu + 2.326 sqrt(mu)
    assert abs(big - (1e6 + 2.3263 * 1000)) <= 2
    with pytest.raises(cap.CapacityError, match="between 0 and 1"):
        cap.poisson_quantile(10, 1.0)


def test_the_operating_point_interpolates_between_the_bounding_levels():
    # TPOT p90: 45 ms at concurrency 32 (within 50), 75 ms at 64 (beyond): it crosses 50 ms (50-45)/(75-45) = 1/6
    # of the way; the measured mean concurrency goes 31 -> 61, so 31 + 30/6 = 36 concurrent requests.
    op = cap.operating_point(levels(), cap.ServiceLevels())
    assert (op["within_load"], op["beyond_load"], op["limited_by"]) == (32, 64, ["TPOT p90"])
    assert op["fraction"] == pytest.approx(1 / 6)
    assert op["load"] == pytest.approx(32 + 32 / 6)
    assert op["capacity"] == pytest.approx(36.0)
    assert op["e2e_mean_s"] == pytest.approx(10.805 + (18.24 - 10.805) / 6)
    assert op["requests_per_s"] == pytest.approx(2.869042 + (3.344298 - 2.869042) / 6)
    assert op["tpot_p90_s"] == pytest.approx(0.050)
    assert [p["within"] for p in op["points"]] == [True] * 6 + [False]


def test_a_ttft_limit_and_a_goodput_share_bound_the_point_too():
    # TTFT p90 0.3 s at 16, 0.5 s at 32; limit 0.4 s: half way, 15.6 + 15.4 / 2 = 23.3 concurrent
    op = cap.operating_point(levels(), cap.ServiceLevels(tpot_p90_s=1.0, ttft_p90_s=0.4))
    assert (op["within_load"], op["beyond_load"], op["limited_by"]) == (16, 32, ["TTFT p90"])
    assert op["capacity"] == pytest.approx(23.3)
    # goodput share 98.4375% at 16, 93.75% at 32; 95%: (0.984375 - 0.95) / (0.984375 - 0.9375) = 0.7333 of the way
    op = cap.operating_point(levels(), cap.ServiceLevels(goodput=0.95))
    assert (op["within_load"], op["beyond_load"], op["limited_by"]) == (16, 32, ["goodput share"])
    assert op["fraction"] == pytest.approx(0.034375 / 0.046875, abs=1e-5)
    assert op["capacity"] == pytest.approx(15.6 + 15.4 * 0.034375 / 0.046875, abs=1e-4)


def test_unsorted_and_open_loop_levels_are_sorted_by_load():
    shuffled = levels()[::-1]
    assert cap.operating_point(shuffled, cap.ServiceLevels())["capacity"] == pytest.approx(36.0)
    rated = levels()
    for level, rate in zip(rated, (0.2, 0.4, 0.7, 1.25, 1.9, 2.9, 3.3)):
        level.update(mode="rate", concurrency=None, rate=rate)
    op = cap.operating_point(rated[::-1], cap.ServiceLevels())
    assert (op["axis"], op["within_load"], op["beyond_load"]) == ("rate", 2.9, 3.3)
    assert op["load"] == pytest.approx(2.9 + 0.4 / 6) and op["capacity"] == pytest.approx(36.0)
    mixed = levels()
    mixed[0].update(mode="rate", concurrency=None, rate=0.1)
    with pytest.raises(cap.CapacityError, match="mixes concurrency and rate"):
        cap.operating_point(mixed, cap.ServiceLevels())


def test_a_curve_that_never_crosses_gives_its_heaviest_level():
    op = cap.operating_point(levels(), cap.ServiceLevels(tpot_p90_s=1.0, ttft_p90_s=10.0))
    assert op["saturated"] and op["beyond_load"] is None and op["capacity"] == 61.0


def test_the_reverse_finds_the_largest_organisation_that_fits():
    # 3 GPUs, 1 in reserve: 2 replicas × 30 = 60 in flight at most. The largest mean whose 0.99 quantile is
    # <= 60 is about 44.3 (44.3 + 2.33 × 6.66 ≈ 60): 44.3 / (12 s × 20 / 3600 × 10%) ≈ 6,646 people.
    rev = fl.people_served(3, 12.0, 30.0, 0.99, 1, 1, PER_PERSON)
    assert (rev["serving_replicas"], rev["max_peak"], rev["people"]) == (2, 60, 6646)
    assert cap.poisson_quantile(6646 * PER_PERSON * 12, 0.99) <= 60 < cap.poisson_quantile(6647 * PER_PERSON * 12,
                                                                                           0.99)
    # and forward again: those people need 2 serving replicas, one more person would need 3
    assert fl.fleet(6646 * PER_PERSON, 12.0, 30.0, 0.99, 1, 1)["gpus"] == 3
    assert fl.fleet(6647 * PER_PERSON, 12.0, 30.0, 0.99, 1, 1)["gpus"] == 4
    assert fl.people_served(6, 12.0, 30.0, 0.99, 1, 2, PER_PERSON)["people"] == 6646  # 6 GPUs / tp 2 = 3
    with pytest.raises(cap.CapacityError, match="none is left to serve"):
        fl.people_served(1, 12.0, 30.0, 0.99, 1, 1, PER_PERSON)


def fixture_curve():
    return duration_curve(cap.operating_point(levels(), cap.ServiceLevels())["points"])


def test_w_is_the_fixed_point_at_the_load_the_serving_replicas_carry():
    # 2 serving replicas each hold m = L / 2; on the curve's segment from (7.8, 6.24 s) to (15.6, 8.105 s),
    # W = 6.24 + b (m - 7.8) with b = 1.865 / 7.8, so L = λ·W solves to L = λ (6.24 - 7.8 b) / (1 - λ b / 2)
    rate, b = 10_000 / 3600, 1.865 / 7.8
    exact = rate * (6.24 - 7.8 * b) / (1 - rate * b / 2)
    assert exact == pytest.approx(18.195, abs=1e-3)
    point = fl.load_fixed_point(rate, fixture_curve(), 2, 12.044166)
    assert point["converged"] and point["iterations"] < 40
    assert point["mean_concurrency"] == pytest.approx(exact, rel=1e-8)
    assert point["per_replica_concurrency"] == pytest.approx(exact / 2) and 7.8 < exact / 2 < 15.6
    assert point["duration_s"] == pytest.approx(exact / rate)
    plan = fl.fleet(rate, 12.044166, 36.0, 0.99, 1, 1, fixture_curve())
    assert plan["from_curve"] and plan["mean_concurrency"] == pytest.approx(exact, rel=1e-8)
    assert plan["peak"] == cap.poisson_quantile(exact, 0.99) == 29
    # ceil(29 / 36) = 1, but one replica alone runs hotter: W(29.1) = 10.47 s, L 29.1, peak 42 > 36. Iterating
    # R = ceil(peak / C) would cycle 2 -> 1 -> 2; the fewest serving replicas whose own peak fits is 2.
    assert (plan["serving_replicas"], plan["replicas"], plan["gpus"]) == (2, 3, 3)
    fewer = plan["fewer"]
    assert fewer["serving_replicas"] == 1 and fewer["peak"] == 42 and fewer["duration_s"] == pytest.approx(10.468,
                                                                                                          abs=1e-3)
    # the conservative figure, W at the operating point, stays visible
    assert plan["at_operating_point"]["peak"] == 48 and plan["at_operating_point"]["serving_replicas"] == 2
    # below the lightest level the lightest latency holds: 20 people, m about 0.05 -> W = 4.64 s
    tiny = fl.fleet(20 * PER_PERSON, 12.044166, 36.0, 0.99, 1, 1, fixture_curve())
    assert tiny["duration_s"] == 4.64 and tiny["serving_replicas"] == 1
    # a flat curve is the hand-worked case: W = 12 s at any load
    flat = fl.fleet(rate, 12.0, 30.0, 0.99, 1, 1, [(1.0, 12.0), (60.0, 12.0)])
    assert (flat["mean_concurrency"], flat["peak"], flat["gpus"]) == (pytest.approx(33.333, abs=1e-3), 47, 3)


def test_the_fixed_point_grows_the_fleet_with_the_organisation():
    curve = fixture_curve()
    previous = 0
    for users in (1000, 5000, 10_000, 20_000, 50_000, 200_000):
        plan = fl.fleet(users * PER_PERSON, 12.044166, 36.0, 0.99, 1, 1, curve)
        assert plan["converged"] and plan["serving_replicas"] >= previous
        assert plan["peak"] <= plan["serving_replicas"] * 36.0  # its own peak fits
        assert plan["fewer"] is None or plan["fewer"]["peak"] > plan["fewer"]["serving_replicas"] * 36.0
        assert plan["serving_replicas"] <= plan["at_operating_point"]["serving_replicas"]
        previous = plan["serving_replicas"]


def test_the_reverse_uses_the_fixed_point_too():
    # 8 GPUs, 1 in reserve: 7 × 36 = 252 in flight at most. The largest organisation whose fixed-point peak fits
    rev = fl.people_served(8, 12.044166, 36.0, 0.99, 1, 1, PER_PERSON, fixture_curve())
    assert (rev["serving_replicas"], rev["max_peak"], rev["people"]) == (7, 252, 36172)
    assert rev["peak"] <= 252 and rev["at_operating_point"]["people"] == 32501
    assert fl.fleet(rev["people"] * PER_PERSON, 12.044166, 36.0, 0.99, 1, 1, fixture_curve())["gpus"] <= 8
    one_more = fl.load_fixed_point((rev["people"] + 1) * PER_PERSON, fixture_curve(), 7, 12.044166)
    assert cap.poisson_quantile(one_more["mean_concurrency"], 0.99) > 252
    # on a flat curve the reverse is the hand-worked one
    assert fl.people_served(3, 12.0, 30.0, 0.99, 1, 1, PER_PERSON, [(1.0, 12.0), (60.0, 12.0)])["people"] == 6646


def test_the_token_view():
    # 32,768 KV tokens / (512 prompt + 256 / 2 output) = 51.2 requests; / (512 + 256) = 42.7 at their last token
    tok = cap.token_view(32768, 512.0, 256.0)
    assert tok["tokens_per_request"] == 640 and tok["concurrency_bound"] == pytest.approx(51.2)
    assert tok["concurrency_bound_at_end"] == pytest.approx(32768 / 768)


def test_the_busiest_hour_of_a_request_log(tmp_path):
    quiet = [i * 36.0 for i in range(100)]  # 100 requests in the first hour
    # 300 in 50 minutes from 1:30: calendar hours would split them 180 + 120; the sliding hour holds all
    busy = [5400 + i * 10.0 for i in range(300)]
    assert cap.busiest_hour(quiet + busy)["requests"] == 300
    assert cap.busiest_hour(quiet + busy)["rate"] == pytest.approx(300 / 3600)
    log = tmp_path / "requests.jsonl"
    log.write_text("1700000000\n\"2023-11-14T22:13:30Z\"\n{\"timestamp\": 1700000040}\n\n"
                   "{\"created\": 1700000060000}\n")  # seconds, ISO, object, milliseconds
    assert cap.read_request_log(log) == [1700000000.0, 1700000010.0, 1700000040.0, 1700000060.0]
    short = cap.busiest_hour(cap.read_request_log(log))
    assert short["shorter_than_window"] and short["rate"] == pytest.approx(3 / 60)


# ---- the simulation ----------------------------------------------------------------------------------------


def test_the_simulation_agrees_with_the_closed_form_on_a_flat_curve():
    # every request takes 12 s whatever the load: in flight is exactly Poisson(λ·W) = Poisson(33.3), 0.99 -> 47
    curve = [(1.0, 12.0), (60.0, 12.0)]
    started = time.monotonic()
    sim = simulate(curve, 10_000 / 3600, 2, 30.0, 0.99, seed=1)
    assert time.monotonic() - started < 3
    assert abs(sim["peak"] / 47 - 1) <= 0.05
    assert sim["mean_in_flight"] == pytest.approx(33.33, rel=0.03)
    # 2 replicas of 20: least-loaded routing puts a 21st on a replica once the fleet holds about 41, and
    # P(Poisson(33.3) >= 41) = 0.11; departures unbalance the replicas, so a little more than that
    over = simulate(curve, 10_000 / 3600, 2, 20.0, 0.99, seed=1, arrivals=40_000)["share_time_over_capacity"]
    assert 0.10 < over < 0.16
    assert simulate(curve, 10_000 / 3600, 2, 10.0, 0.99, arrivals=20_000)["share_time_over_capacity"] > 0.9
    assert simulate(curve, 10_000 / 3600, 2, 1000.0, 0.99, arrivals=20_000)["share_time_over_capacity"] == 0
    assert simulate(curve, 10_000 / 3600, 2, 30.0, 0.99, seed=1) == sim  # seeded: repeatable


def test_durations_follow_the_measured_curve():
    curve = [(1.0, 4.0), (31.0, 10.0), (61.0, 16.0)]
    assert [interpolate(curve, x) for x in (0.5, 1.0, 16.0, 46.0, 100.0)] == [4.0, 4.0, 7.0, 13.0, 16.0]
    # requests 4 s each on lightly loaded replicas: about 2.78 × 4 = 11 in flight, far below the 12-s closed form
    light = simulate(curve, 10_000 / 3600, 8, 30.0, 0.99)
    assert light["mean_in_flight"] == pytest.approx(10_000 / 3600 * 4.3, rel=0.1)


@pytest.mark.parametrize("users", [5000, 10_000])
def test_the_simulation_agrees_with_the_fixed_point_on_the_rising_curve(users):
    # the fixture's curve rises 4.64 s -> 18.24 s; sized by the fixed point, the fleet's replicas run at m = 9.1
    # (5000 people) where requests take 6.55 s, not the 12.04 s of the operating point
    rate, curve = users * PER_PERSON, fixture_curve()
    plan = fl.fleet(rate, 12.044166, 36.0, 0.99, 1, 1, curve)
    sim = simulate(curve, rate, plan["serving_replicas"], 36.0, 0.99)
    assert abs(sim["peak"] / plan["peak"] - 1) <= 0.05, (sim["peak"], plan["peak"])
    assert abs(sim["mean_in_flight"] / plan["mean_concurrency"] - 1) <= 0.05
    # the operating point's W would miss by far more than 5%: this test tells the two apart
    assert sim["peak"] / plan["at_operating_point"]["peak"] - 1 < -0.05


def flat_sweep(tmp_path) -> Path:
    doc = json.loads(SWEEP.read_text())
    for level in doc["levels"]:
        level["e2e_s"]["mean"] = 12.0
    return write(tmp_path, doc)


def test_the_command_simulates_and_agrees_within_5_percent_on_a_flat_curve(tmp_path):
    out = tmp_path / "out"
    result = run("--from", flat_sweep(tmp_path), "--org-users", 5000, "--simulate", "--output-dir", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "capacity.json").read_text())
    assert doc["organisation"]["peak"] == 47  # W = 12 s at every load
    assert abs(doc["simulation"]["agreement"]) <= 0.05
    assert doc["simulation"]["replicas"] == doc["organisation"]["serving_replicas"]


def test_the_command_simulates_and_agrees_within_5_percent_on_the_rising_curve(tmp_path):
    out = tmp_path / "out"
    result = run("--from", SWEEP, "--org-users", 5000, "--simulate", "--output-dir", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "capacity.json").read_text())
    org, sim = doc["organisation"], doc["simulation"]
    assert (org["peak"], org["at_operating_point"]["peak"], sim["peak"]) == (29, 48, 30)
    assert abs(sim["agreement"]) <= 0.05 and sim["replicas"] == org["serving_replicas"] == 2
    assert "differs from the closed form's by more than 5%" not in " ".join(result.output.split())
    # --gpus alone simulates the reverse's organisation on its serving replicas
    result = run("--from", SWEEP, "--gpus", 3, "--simulate", "--output-dir", tmp_path / "rev")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "rev" / "capacity.json").read_text())
    assert doc["simulation"]["replicas"] == doc["reverse"]["serving_replicas"] == 2


# ---- the command: bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("args, code, message", [
    (["--active-share", "1.5"], 2, "--active-share is a share in [0, 1]"),
    (["--active-share", "-0.1"], 2, "--active-share is a share in [0, 1]"),
    (["--org-users", "0"], 2, "at least one person"),
    (["--org-users", "-5"], 2, "at least one person"),
    (["--goodput", "1.2"], 2, "--goodput is a share in (0, 1]"),
    (["--peak-quantile", "1"], 2, "--peak-quantile is a share in (0, 1)"),
    (["--tpot-p90", "0"], 2, "--tpot-p90 must be positive"),
    (["--tpot-p90", "10"], 1, "even the lightest measured level"),
    (["--gpus", "1"], 1, "none is left to serve"),
    (["--simulate"], 1, "--simulate needs arrivals"),
    (["--request-log", "missing.jsonl"], 2, "does not exist"),
])
def test_bad_options_say_what_is_wrong(args, code, message):
    result = run("--from", SWEEP, *args)
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())


@pytest.mark.parametrize("content, message", [
    ("", "not JSON"),
    ("{\"kind\": \"sweep\", \"levels\": [", "not JSON"),
    ("[1, 2]", "expected a `kvgate bench sweep` result"),
    ("{\"kind\": \"engine\", \"levels\": []}", "not a sweep"),
    ("{\"kind\": \"sweep\", \"levels\": []}", "no measured levels"),
    ("{\"kind\": \"sweep\"}", "no measured levels"),
    ("{\"kind\": \"sweep\", \"levels\": [{\"mode\": \"concurrency\"}]}", "level 0 lacks"),
])
def test_bad_result_files_say_what_is_wrong(tmp_path, content, message):
    result = run("--from", write(tmp_path, content))
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_a_missing_file_and_a_bad_request_log(tmp_path):
    result = run("--from", tmp_path / "nowhere.json")
    assert result.exit_code == 2 and "does not exist" in result.output
    log = write(tmp_path, "1700000000\nnot json\n", "log.jsonl")
    result = run("--from", SWEEP, "--request-log", log)
    assert result.exit_code == 1 and "log.jsonl:2: not JSON" in result.output
    log = write(tmp_path, "{\"user\": 3}\n", "log.jsonl")
    assert "log.jsonl:1: no timestamp" in run("--from", SWEEP, "--request-log", log).output
    log = write(tmp_path, "1700000000\n1700000100\n", "log.jsonl")
    result = run("--from", SWEEP, "--request-log", log, "--gpus", 4)
    assert result.exit_code == 1 and "needs --org-users" in result.output


# ---- the command: what it tells and writes -----------------------------------------------------------------


def test_the_printed_reasoning_names_the_levels_and_the_numbers():
    result = run("--from", SWEEP, "--org-users", 5000, "--gpus", 8)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for expected in ("concurrency 32 is within (TPOT p90 45.0 ms", "concurrency 64 is beyond (TPOT p90 75.0 ms",
                     "16.7% of the way from 32 to 64", "36.0 concurrent requests", "W = 12.04 s",
                     "5,000 people × 10% active × 20 requests an hour = 10,000 requests an hour: λ = 2.78",
                     "With 2 serving replica(s) (the 1 in reserve is the one down", "m = 9.1, W = 6.55 s",
                     "L = λ·W = 2.78 × 6.55 s = 18.2", "its 99% quantile is 29",
                     "ceil(29 / 36.0) = 1 would do at this W, but on 1 each would carry m = 29.1",
                     "the peak 42 > 1 × 36.0; so 2 serving, the fewest whose own peak fits",
                     "+ 1 in reserve = 3 replicas × tensor-parallel 1 = 3 GPUs",
                     "At the operating point (every replica at C) W would be 12.04 s, L 33.5, peak 48",
                     "7 serve up to 252 requests in flight", "is 36,172 people", "W = 10.82 s",
                     "it would be 32,501", "32,768 tokens", "51.2 requests fit before preemption"):
        assert expected in text, expected


def test_the_json_result_and_the_charts(tmp_path):
    out = tmp_path / "out"
    result = run("--from", SWEEP, "--org-users", 5000, "--gpus", 8, "--tensor-parallel-size", 2,
                 "--output-dir", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "capacity.json").read_text())
    assert {"kind", "header", "settings", "levels", "stopped_early", "notes"} <= set(doc)
    assert doc["kind"] == "capacity" and doc["stopped_early"] is None and len(doc["levels"]) == 7
    assert doc["header"]["source"] == str(SWEEP) and doc["header"]["device"].startswith("NVIDIA H200")
    assert doc["settings"]["org_users"] == 5000 and doc["settings"]["tpot_p90_ms"] == 50.0
    assert doc["replica"]["capacity"] == pytest.approx(36.0) and doc["replica"]["within_load"] == 32
    org = doc["organisation"]
    assert org["rate"] == pytest.approx(2.7778, abs=1e-4) and org["peak"] == 29
    assert org["duration_s"] == pytest.approx(6.55, abs=0.005) and org["mean_concurrency"] == pytest.approx(18.195,
                                                                                                          abs=1e-3)
    assert org["per_replica_concurrency"] == pytest.approx(9.10, abs=0.005) and org["converged"]
    assert org["at_operating_point"] == {"duration_s": pytest.approx(12.044, abs=1e-3),
                                         "mean_concurrency": pytest.approx(33.456, abs=1e-3), "peak": 48,
                                         "serving_replicas": 2}
    assert (org["serving_replicas"], org["replicas"], org["gpus"]) == (2, 3, 6)
    assert doc["reverse"]["serving_replicas"] == 3  # 8 GPUs / tp 2 = 4 replicas, 1 in reserve
    assert doc["reverse"]["people"] > doc["reverse"]["at_operating_point"]["people"]
    assert doc["tokens"]["concurrency_bound"] == pytest.approx(51.2)
    assert doc["simulation"] is None and len(doc["reasoning"]) >= 8
    assert not list(out.glob("*.tmp"))
    assert charts.points_of(out / "capacity-tpot.png") == 7 and charts.points_of(out / "capacity-ttft.png") == 7
    assert (out / "capacity.html").exists()
    result = run("--from", SWEEP, "--goodput", 0.95, "--kv-tokens", 1000, "--output-dir", tmp_path / "g")
    assert result.exit_code == 0, result.output
    assert charts.points_of(tmp_path / "g" / "capacity-goodput.png") == 7
    doc = json.loads((tmp_path / "g" / "capacity.json").read_text())
    assert doc["organisation"] is None and doc["tokens"]["kv_tokens"] == 1000
    assert "scheduler preempts" in " ".join(result.output.split())  # 1,000 tokens hold 1.6 requests, not 26.9


def test_a_sweep_without_server_info_leaves_the_token_view_out(tmp_path):
    doc = json.loads(SWEEP.read_text())
    doc["header"] = {}
    result = run("--from", write(tmp_path, copy.deepcopy(doc)), "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "capacity.json").read_text())["tokens"] is None
    assert "No KV capacity known" in " ".join(result.output.split())


@pytest.mark.skipif(not Browser.available(), reason="Debian's chromium is not installed")
def test_the_html_report_opens_in_chromium(tmp_path):
    out = tmp_path / "out"
    assert run("--from", SWEEP, "--org-users", 5000, "--simulate", "--output-dir", out).exit_code == 0
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(out / "capacity.html")
        assert browser.evaluate("document.images.length") >= 2
        assert browser.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        assert "GPUs" in browser.evaluate("document.querySelector('table').textContent")
        browser.evaluate("document.querySelector('#selector').scrollIntoView()")  # the click lands on screen
        browser.click('#selector button[data-view="6"]')
        shown = browser.evaluate("[...document.querySelectorAll('section.view')].filter(s => !s.hidden).length")
        assert shown == 1
        assert browser.evaluate("document.querySelector('section.view[data-view=\"6\"]').hidden") is False
        assert browser.evaluate("document.querySelector('#selector [aria-selected=true]').textContent") == "64"
        assert browser.errors() == []
    finally:
        browser.close()


# ---- --url: sweep a server first ---------------------------------------------------------------------------


def test_url_sweeps_the_server_first_then_forecasts(tmp_path):
    from bench.fake_openai import FakeOpenAI

    fake = FakeOpenAI(delay_s=0.001).start_thread()
    out = tmp_path / "out"
    try:
        result = run("--url", fake.url, "--model", "fake", "--concurrency", "1,2", "--requests", 4,
                     "--prompt-tokens", 4, "--max-tokens", 8, "--org-users", 100, "--output-dir", out)
    finally:
        fake.stop()
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["kind"] == "sweep" and [lv["concurrency"] for lv in sweep["levels"]] == [1, 2]
    assert sweep["settings"]["slo_tpot_ms"] == 50.0  # goodput counted against the forecast's levels
    doc = json.loads((out / "capacity.json").read_text())
    assert doc["header"]["source"] == str(out / "sweep.json") and doc["header"]["url"] == fake.url
    assert doc["settings"]["concurrency"] == [1, 2] and doc["settings"]["max_tokens"] == "8"
    assert doc["replica"]["saturated"]  # a fake server that answers at once never crosses 50 ms
    assert doc["tokens"]["kv_tokens"] == 4096  # the fake's /info max_batch_total_tokens
    assert doc["organisation"]["gpus"] >= 2


def test_from_or_url_not_both_nor_neither(tmp_path):
    result = run("--url", "http://127.0.0.1:9", "--from", SWEEP)
    assert result.exit_code == 2 and "not both" in result.output
    result = run("--org-users", 10)
    assert result.exit_code == 2 and "give --from sweep.json" in result.output
    result = run("--url", "http://127.0.0.1:9", "--concurrency", "1", "--requests", 1, "--output-dir", tmp_path)
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:9" in result.output  # nothing listens there


def test_ctrl_c_during_the_sweep_keeps_the_finished_levels(tmp_path):
    out = tmp_path / "out"
    returncode, stderr = interrupt_second_level("from bench.capacity_command import capacity; capacity()", out)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: 1 finished level(s) kept" in stderr
    doc = json.loads((out / "sweep.json").read_text())
    assert [lv["concurrency"] for lv in doc["levels"]] == [1] and doc["stopped_early"].startswith("interrupted")
