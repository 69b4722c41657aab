"""LR schedules: warmup, cosine, WSD and constant hit their defining points."""

import math

import pytest

from zenlm.config.schema import OptimConfig
from zenlm.train.schedule import build_lr_lambda


def test_cosine():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, train_steps=110, schedule="cosine")
    f = build_lr_lambda(o)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_wsd():
    o = OptimConfig(
        lr=2.0, min_lr=0.2, warmup_steps=5, train_steps=100, decay_fraction=0.2, schedule="wsd"
    )
    f = build_lr_lambda(o)
    assert f(2) == pytest.approx(3 / 5)
    assert f(5) == f(79) == 1.0
    assert f(90) == pytest.approx(1 - 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)


def test_constant():
    f = build_lr_lambda(OptimConfig(warmup_steps=4, schedule="constant"))
    assert [f(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
