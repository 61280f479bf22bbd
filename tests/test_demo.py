"""The demo behind the README's first quick-start command, in one short epoch, on every backend.

On JAX and PyTorch (`KERAS_BACKEND=jax|torch`, no TensorFlow installed) the demo runs the same
monitored model -- penalties, noise scale, histograms, the Hessian monitor -- and writes the epoch
scalars with gradmon's own writer instead of Keras' TensorBoard callback (which needs TensorFlow).
"""

import os

import keras

from gradmon import demo, tags
from helpers import read_events


def test_demo_writes_gradients_penalties_and_curvature(tmp_path, capsys):
    demo.run(log_dir=str(tmp_path), epochs=1)
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {tmp_path}" in out
    off_tf = keras.backend.backend() != "tensorflow"
    assert ("Keras' TensorBoard callback needs TensorFlow" in out) == off_tf
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.global_norm("raw")]) == list(range(1, 46))
    for tag in (tags.CLIP_RATIO, tags.penalty("weight"), tags.NOISE_SCALE, tags.eigenvalue(3),
                tags.HESSIAN_TRACE, tags.EDGE_OF_STABILITY):
        assert tag in events, tag
    assert 0 < events[tags.CLIP_RATIO][45] <= 1
    assert events[tags.eigenvalue(1)][45] >= events[tags.eigenvalue(3)][45]
    assert "epoch_loss" in read_events(os.path.join(str(tmp_path), "validation"))
    assert "epoch_accuracy" in read_events(os.path.join(str(tmp_path), "train"))
    # the README's next step: `gradmon summary runs/demo` (a table per layer, the curvature)
    from gradmon.summary import report
    rep = report.health_report(report.load_run(str(tmp_path)))
    assert rep.summary.logged_steps == 45 and rep.grouping_source == "recorded"
    assert len(rep.layers) == 3 and rep.curvature is not None
    assert rep.curvature.eigenvalue.last == events[tags.eigenvalue(1)][max(events[tags.eigenvalue(1)])]
    from gradmon.__main__ import main
    assert main(["summary", str(tmp_path)]) == 0
    assert "curvature:" in capsys.readouterr().out
