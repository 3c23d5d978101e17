"""LoadMeter against hand-computed figures on a fake clock."""

import pytest

from glm_ray.experts.load import LoadMeter


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_busy_fraction_and_tokens_over_the_window():
    clock = Clock()
    meter = LoadMeter(window_s=4.0, clock=clock)
    for _ in range(4):  # 4 s of work at 0.25 s busy and 100 tokens a second
        clock.t += 1.0
        meter.record(0.25, 100)
    busy, tokens = meter.rates()
    assert busy == pytest.approx(0.25) and tokens == pytest.approx(100.0)
    # one-second buckets: a shorter window is right to within one second's work
    busy, tokens = meter.rates(2.0)
    assert busy == pytest.approx(0.25, abs=0.25 / 2) and tokens == pytest.approx(100.0, abs=100 / 2)


def test_idle_decays_to_zero_and_young_replicas_use_their_lifetime():
    clock = Clock()
    meter = LoadMeter(window_s=4.0, clock=clock)
    clock.t += 0.5
    meter.record(0.25, 10)
    assert meter.rates()[0] == pytest.approx(0.5)  # 0.25 s busy in its first 0.5 s
    clock.t += 10.0
    assert meter.rates() == (0.0, 0.0)


def test_busy_is_capped_and_window_must_be_positive():
    clock = Clock()
    meter = LoadMeter(window_s=2.0, clock=clock)
    clock.t += 2.0
    meter.record(5.0, 1)  # work measured across a stall: never more than fully busy
    assert meter.rates()[0] == 1.0
    with pytest.raises(ValueError, match="window_s"):
        LoadMeter(window_s=0)
