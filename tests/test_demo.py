"""The demo behind the README's first quick-start command, in one short epoch."""

import os

import pytest

from gradmon import demo, tags
from helpers import read_events


def test_demo_writes_gradients_penalties_and_curvature(tmp_path, capsys):
    demo.run(log_dir=str(tmp_path), epochs=1)
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in out
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == list(range(1, 46))
    for tag in (tags.CLIP_RATIO, tags.penalty("weight"), tags.NOISE_SCALE, tags.eigenvalue(3),
                tags.HESSIAN_TRACE, tags.EDGE_OF_STABILITY):
        assert tag in events, tag
    assert 0 < events[tags.CLIP_RATIO][45] <= 1
    assert events[tags.eigenvalue(1)][45] >= events[tags.eigenvalue(3)][45]
    assert "epoch_loss" in read_events(os.path.join(str(tmp_path), "validation"))
