"""The schedule: one rule, the same on the host and in the compiled step."""

import pytest
import tensorflow as tf

from gradmon.publish.schedule import NEVER, Schedule, is_due

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)


def _expected(step, every, log_at):
    # written out independently: a multiple of a positive `every`, or the one step `log_at`
    return (every > 0 and step % every == 0) or step == log_at


@pytest.mark.parametrize("every, log_at", [(1, -1), (3, -1), (0, 7), (4, 6), (5, 10), (0, -1)])
def test_the_host_and_the_device_agree_on_every_step(every, log_at):
    schedule = Schedule(every=every, log_at=log_at)
    device_every, device_log_at, _ = schedule.device_values()
    every_var = tf.Variable(device_every, dtype=tf.int64)
    log_at_var = tf.Variable(device_log_at, dtype=tf.int64)
    steps = tf.range(1, 41, dtype=tf.int64)
    on_device = tf.function(lambda s: tf.map_fn(lambda t: is_due(t, every_var, log_at_var), s,
                                                fn_output_signature=tf.bool))(steps).numpy().tolist()
    expected = [_expected(s, every, log_at) for s in range(1, 41)]
    assert on_device == expected
    assert [schedule.due(s) for s in range(1, 41)] == expected


def test_never_is_a_period_no_run_reaches():
    assert Schedule(every=0, hist_every=0).device_values() == (NEVER, -1, NEVER)
    assert not any(Schedule(every=0).due(s) for s in range(1, 1000))
    assert not Schedule(hist_every=0).histogram_due(NEVER // 2)


def test_next_due_after_is_the_first_step_written_or_taking_histograms():
    schedule = Schedule(every=5, hist_every=3)
    for step in range(0, 40):
        expected = next(s for s in range(step + 1, step + 20)
                        if _expected(s, 5, -1) or s % 3 == 0)
        assert schedule.next_due_after(step) == expected
    assert Schedule(every=0, log_at=12).next_due_after(3) == 12
    assert Schedule(every=0, log_at=12).next_due_after(12) == float("inf")


def test_due_steps_between_two_reads():
    schedule = Schedule(every=4, log_at=10)
    assert schedule.due_steps(1, 20, limit=10) == [4, 8, 10, 12, 16, 20]
    assert schedule.due_steps(5, 11, limit=10) == [8, 10]
    assert schedule.due_steps(1, 40, limit=2) == [4, 8, 10, 12]  # limit + 1 multiples, and log_at


def test_set_changes_only_what_is_given():
    schedule = Schedule(every=2, log_at=5, hist_every=3)
    assert not schedule.set()
    assert schedule.set(log_at=9)
    assert (schedule.every, schedule.log_at, schedule.hist_every) == (2, 9, 3)
