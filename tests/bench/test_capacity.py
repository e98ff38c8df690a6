"""`kvgate capacity`'s arithmetic: cases worked by hand, the interpolation between measured levels, the fixed
point, the reverse, the token view, a request log, and the simulation against the closed form (the command and
its outputs: test_capacity_command.py)."""

from __future__ import annotations

import math
import time

import pytest

from bench import capacity as cap
from bench import capacity_fleet as fl
from bench.capacity_fleet import duration_curve
from bench.capacity_sim import interpolate, simulate
from tests.bench.capacity_cases import PER_PERSON, levels

# ---- the arithmetic, worked by hand -----------------------------------------------------------------------


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
