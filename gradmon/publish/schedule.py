"""Which steps are measured and written: the `Schedule`, and its rule (coded once).

A step is due when it is a multiple of `every` or is the step `log_at`;
histograms are taken at the multiples of `hist_every`. The host owns the one
`Schedule` of an observer (`GradientMonitor` or `observe(update_freq=)` set
it) and writes it into the device's variables (`Recorder.every`, ...); the
compiled step applies the same rule, `is_due`, to those variables, so the
device never computes a step the host does not mean to write, and the host
knows which executions hold a due step without reading the device.

Imports nothing: the measuring side (`gradmon.measure.recorder`) uses the rule.
"""

NEVER = 2 ** 62  # a period no run reaches: "never" on the device, without a branch


def is_due(step, every, log_at):
    """Whether `step` is due: a multiple of `every` (a period > 0; `NEVER` for none) or `log_at`.

    The one rule, for host integers and device tensors alike (`%`, `==` and
    `|` are elementwise on tensors).
    """
    return (step % every == 0) | (step == log_at)


def is_histogram_due(step, hist_every):
    """Whether `step` takes histograms (`hist_every`: a period > 0; `NEVER` for none)."""
    return step % hist_every == 0


def passed(period, after, upto):
    """Whether a multiple of `period` (> 0; 0 is never) lies in `(after, upto]`."""
    return period > 0 and upto // period > after // period


def multiples(period, after, upto):
    """How many multiples of `period` (> 0; 0 is never) lie in `(after, upto]`."""
    return upto // period - after // period if period > 0 else 0


class Schedule:
    """When an observer measures: every `every` steps (0: never), at step `log_at` (-1:
    none), and histograms every `hist_every` steps (0: never).

    Host integers; `device_values` are what the device's variables hold.
    """

    def __init__(self, every=1, log_at=-1, hist_every=0):
        self.every, self.log_at, self.hist_every = int(every), int(log_at), int(hist_every)

    def set(self, every=None, log_at=None, hist_every=None):
        """Changes the given parts; returns whether anything changed."""
        before = self.device_values()
        if every is not None:
            self.every = int(every)
        if log_at is not None:
            self.log_at = int(log_at)
        if hist_every is not None:
            self.hist_every = int(hist_every)
        return self.device_values() != before

    def device_values(self):
        """`(every, log_at, hist_every)` as the device holds them (never: `NEVER`)."""
        return (self.every if self.every > 0 else NEVER, self.log_at,
                self.hist_every if self.hist_every > 0 else NEVER)

    def due(self, step):
        """Whether `step` is measured (the host's side of `is_due`)."""
        every, log_at, _ = self.device_values()
        return bool(is_due(int(step), every, log_at))

    def histogram_due(self, step):
        return self.hist_every > 0 and bool(is_histogram_due(int(step), self.hist_every))

    def next_due_after(self, step):
        """The first step after `step` that is measured or takes histograms (`inf`: none)."""
        candidates = [(step // period + 1) * period
                      for period in (self.every, self.hist_every) if period > 0]
        if self.log_at > step:
            candidates.append(self.log_at)
        return min(candidates, default=float("inf"))

    def due_steps(self, first, last, limit):
        """The due steps among `first..last` (at most `limit + 1` of them), in order."""
        start = max(first, 1)
        every = self.every
        due = [] if every <= 0 else list(range(-(-start // every) * every, last + 1, every)[:limit + 1])
        if first <= self.log_at <= last and self.log_at not in due:
            due = sorted(due + [self.log_at])
        return due
