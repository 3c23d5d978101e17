"""`glm-ray bench --soak`: the RSS reading and the first-minute / last-minute comparison it reports."""

import argparse
import os

import pytest

from glm_ray.bench.soak import parse_soak, rss_growth, rss_snapshot


def test_rss_of_this_process_is_read_with_its_role():
    snap = rss_snapshot()
    role, resident = snap[os.getpid()]
    assert role == "bench client" and 10 << 20 < resident < 64 << 30


def test_growth_compares_the_first_minute_with_the_last_per_process():
    mib = 1 << 20
    samples = [(t + 0.5, {1: ("AttentionReplica", (900 + (t >= 60) * 9) * mib), 2: ("Ingress", 300 * mib)})
               for t in range(120)]
    samples[70][1][3] = ("ExpertGroup_0", 50 * mib)  # seen in one window only: no comparison
    growth = rss_growth(samples, 120.0)
    assert [g["role"] for g in growth] == ["AttentionReplica", "Ingress"]
    assert growth[0]["first_mib"] == 900.0 and growth[0]["last_mib"] == 909.0 and growth[0]["growth"] == 0.01
    assert growth[1]["growth"] == 0.0
    half = rss_growth(samples[:40], 40.0)  # shorter than two minutes: halves
    assert half[0]["first_mib"] == half[0]["last_mib"] == 900.0


def test_the_soak_takes_one_phase():
    assert parse_soak("200:120").num_clients == 200
    with pytest.raises(argparse.ArgumentTypeError, match="one CLIENTS:SECONDS"):
        parse_soak("1:10,2:10")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_soak("lots")
