"""The engine core's thread count on the CPU: a thread per core it may use, one fewer for each core other
processes take (past a little slack for the gateway), back when they leave; measured at most once a second."""

from __future__ import annotations

import os

from engine.cpu_threads import CpuThreads, busy_seconds


class _Machine:
    """Fake /proc: per second, others use `others` cores' worth and the engine `own`."""

    def __init__(self) -> None:
        self.t = self.busy = self.own = 0.0
        self.others, self.engine = 0.0, 2.0
        self.set_to: list[int] = []

    def run(self, seconds: float) -> None:
        self.t += seconds
        self.busy += (self.others + self.engine) * seconds
        self.own += self.engine * seconds


def _controller(m: _Machine, cores: int = 2) -> CpuThreads:
    return CpuThreads(list(range(cores)), m.set_to.append, busy=lambda: m.busy, own=lambda: m.own,
                      clock=lambda: m.t)


def test_a_busy_neighbour_takes_a_thread_and_gives_it_back():
    m = _Machine()
    threads = _controller(m)
    assert m.set_to == [2]
    m.others = 0.2  # the gateway's own work: within the slack
    m.run(1.0)
    assert threads.adjust() == 2
    m.others = 0.6  # a busy loop that gets half a core from the spinning threads beside it
    m.run(1.0)
    assert threads.adjust() == 1 and m.set_to == [2, 1]
    m.others, m.engine = 1.1, 1.0  # with one thread fewer the neighbour has its core
    m.run(1.0)
    assert threads.adjust() == 1
    m.others = 0.1  # it left
    m.run(1.0)
    assert threads.adjust() == 2 and m.set_to == [2, 1, 2]


def test_measured_at_most_once_a_second_and_never_below_one():
    m = _Machine()
    threads = _controller(m, cores=4)
    m.others = 3.9
    m.run(0.5)
    assert threads.adjust() == 4  # too soon to measure
    m.run(0.6)
    assert threads.adjust() == 1
    m.others = 9.0  # more than the cores (other cores' work is not ours to see, but never below 1)
    m.run(1.0)
    assert threads.adjust() == 1
    m.others = 1.2  # one core and a little: one thread fewer
    m.run(1.0)
    assert threads.adjust() == 3


def test_off_on_a_gpu_and_where_the_user_fixed_it(monkeypatch):
    assert CpuThreads.for_device("cuda:0") is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert CpuThreads.for_device("cpu") is None


def test_busy_seconds_reads_this_machine():
    cores = sorted(os.sched_getaffinity(0))
    first = busy_seconds(cores)
    sum(i * i for i in range(2_000_000))  # some work on one of them
    assert busy_seconds(cores) > first > 0
