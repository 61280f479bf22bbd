"""Smoke tests of examples/: each runs tiny in a subprocess, exits 0 and writes gradmon's tags."""

import math
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import read_events

from gradmon import tags

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=EXAMPLES.parent, env=env,
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def last(values):
    return values[max(values)]


def test_seed_1_custom_loss_gradient():
    if not (EXAMPLES / "seed_1_custom_loss_gradient.py").exists():
        pytest.skip("examples/seed_1_custom_loss_gradient.py not written yet")
    run_example("seed_1_custom_loss_gradient.py")  # exits 0 only if its own checks pass


def test_seed_2_clipping(tmp_path):
    out = run_example("seed_2_clipping.py", "--log-dir", str(tmp_path), "--epochs", "1")
    assert "clip ratio" in out and f"tensorboard --logdir {tmp_path}" in out
    events = read_events(tmp_path / "train")
    expected = [
        tags.CLIP_RATIO, tags.CLIP_FRACTION,
        tags.clip_fraction_of("clip_by_value"), tags.clip_fraction_of("clip_by_global_norm"),
        tags.global_norm(tags.RAW), tags.global_norm(tags.TRANSFORMED),
        tags.histogram(tags.RAW, "digits_mlp/hidden/kernel"),
        tags.histogram(tags.TRANSFORMED, "digits_mlp/hidden/kernel"),
    ]
    assert not [t for t in expected if t not in events], sorted(events)
    assert len(events[tags.CLIP_RATIO]) == 45  # one epoch of 1437 training examples, batch 32
    assert all(0 < r <= 1 + 1e-6 for r in events[tags.CLIP_RATIO].values())
    for member in ("clip_by_value", "clip_by_global_norm"):
        fractions = events[tags.clip_fraction_of(member)].values()
        assert all(0 <= f <= 1 for f in fractions) and max(fractions) > 0, member


def test_seed_3_gradient_penalty(tmp_path):
    out = run_example("seed_3_gradient_penalty.py", "--log-dir", str(tmp_path), "--epochs", "1")
    assert "loss/total" in out
    events = read_events(tmp_path / "train")
    expected = [tags.LOSS_DATA, tags.LOSS_TOTAL]
    for name in ("grad_norm", "weight"):
        expected += [tags.penalty(name), tags.penalty_share(name), tags.penalty_grad_norm(name)]
    assert not [t for t in expected if t not in events], sorted(events)
    data, total = last(events[tags.LOSS_DATA]), last(events[tags.LOSS_TOTAL])
    penalties = last(events[tags.penalty("grad_norm")]) + last(events[tags.penalty("weight")])
    assert total == pytest.approx(data + penalties, rel=1e-5)
    assert 0 < last(events[tags.penalty_share("grad_norm")]) < 1
    assert last(events[tags.penalty_grad_norm("grad_norm")]) > 0


def test_wgan_gp(tmp_path):
    out = run_example("wgan_gp.py", "--log-dir", str(tmp_path), "--epochs", "1", "--steps", "4",
                      "--update-freq", "1")
    assert "finite: True" in out
    events = read_events(tmp_path / "train")
    expected = [
        tags.penalty("wgan_gp"), "critic/wasserstein",
        "critic/" + tags.global_norm(tags.RAW), "generator/" + tags.global_norm(tags.RAW),
        "generator/" + tags.CLIP_RATIO, "generator/" + tags.CLIP_FRACTION,
    ]
    assert not [t for t in expected if t not in events], sorted(events)
    for tag in expected:
        assert sorted(events[tag]) == [1, 2, 3, 4], tag
        assert all(math.isfinite(v) for v in events[tag].values()), tag
    assert all(v >= 0 for v in events[tags.penalty("wgan_gp")].values())
