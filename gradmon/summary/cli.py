"""`gradmon summary LOGDIR`: the command line (`add_arguments`, `run_command`); `gradmon/__main__.py`
adds it beside `gradmon demo`. Imports no TensorFlow."""

import json
import os
import sys

from gradmon import tags
from gradmon.summary.events import NoGradmonLogs, is_gradmon_run, load_run, run_directory
from gradmon.summary.analysis import observer_run
from gradmon.summary.health import GROUPING_CHOICES, Thresholds
from gradmon.summary.judgement import health_reports
from gradmon.summary.plot import plot
from gradmon.summary.render import format_tables, reports_to_json
from gradmon.summary.wording import MAX_LISTED
from gradmon._validation import check_positive_int


# Exit statuses of `gradmon summary`.
EXIT_OK = 0
EXIT_DAMAGED = 1  # the report was printed, but an event file is corrupted (or unreadable)
EXIT_ERROR = 2  # no report: bad arguments, no gradmon logs, PNG not writable

# the `Thresholds` fields offered as options (--explode-factor, ...), with their help
_THRESHOLD_OPTIONS = {
    "explode_factor": "exploding when the final or peak global norm exceeds this x its early median",
    "vanish_ratio": "vanishing when a layer's tail update ratio is below this x the layers' median "
                    "(without update ratios: its final norm below this x the largest layer's)",
    "dead_zero_fraction": "dead when this share of a layer's gradient entries is exactly 0 over the tail",
    "inactive_zero_fraction": "note a layer as mostly inactive from this share of exact zeros",
    "clip_share": "persistent clipping when at least this share of tail steps is clipped",
    "edge_of_stability": "flag when sharpness / the optimizer's stability threshold (lr*lambda_1/2 in "
                         "older runs) exceeds this at every tail Hessian probe",
    "at_edge_of_stability": "note training as at the edge of stability when that ratio reaches this "
                            "at a tail Hessian probe",
    "tail_fraction": "the tail is this last share of logged steps",
    "baseline_fraction": "the early steps are this first share of logged steps",
}


def add_arguments(parser):
    """Adds `gradmon summary`'s arguments to an `argparse` parser."""
    parser.add_argument("logdir",
                        help="log_dir of a gradmon.GradientMonitor run (or its train/ subdirectory)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--png", metavar="FILE",
                        help="also draw the key curves into this PNG, creating its directory "
                             "(needs matplotlib)")
    parser.add_argument("--grouping", choices=GROUPING_CHOICES, default="auto",
                        help="the grouping the run was monitored with; 'layer': each logged group is a row, "
                             "'variable': rows are variable paths minus their last component (default: auto, "
                             "what the run recorded; variable for runs that recorded none)")
    parser.add_argument("--max-listed", type=int, default=MAX_LISTED,
                        help=f"name at most this many layers per kind of finding, count the rest "
                             f"(default: {MAX_LISTED})")
    defaults = Thresholds()
    group = parser.add_argument_group("thresholds")
    for name, text in _THRESHOLD_OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name),
                           help=f"{text} (default: {getattr(defaults, name):g})")
    parser.epilog = (f"exit status: {EXIT_OK} report printed; {EXIT_DAMAGED} report printed, but an "
                     "event file is corrupted (records lost; each file named on stderr with its "
                     "last good step) or an entry named like one is no readable file (a directory, "
                     f"a broken link); {EXIT_ERROR} bad arguments or no gradmon logs (no report), "
                     "or the PNG could not be written")
    return parser


def run_command(args):
    """Runs `gradmon summary` with parsed `args`.

    Returns:
        The exit status: 0; 1 when the report was printed but an event file is
        corrupted (each damaged file is named on stderr with its last good
        step) or an entry named like one could not be read; 2 on errors (bad
        arguments, no gradmon logs, an unwritable PNG). Several optimizers
        (`name=`) give one report each (`health_reports`); steps written by
        several files are warned of on stderr (`HealthReport.overlaps`).
    """
    try:
        run, reports = _judge_logdir(args)
    except ValueError as error:  # NoGradmonLogs or a bad threshold
        print(f"gradmon summary: {error}", file=sys.stderr)
        return EXIT_ERROR
    for problem in reports[0].read_problems:
        print(f"gradmon summary: warning: {problem.message}", file=sys.stderr)
    for report in reports:
        for overlap in report.overlaps:
            print(f"gradmon summary: warning: {overlap.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(reports_to_json(reports), indent=2, allow_nan=False))
    else:
        print(format_tables(reports, max_listed=args.max_listed))
    if args.png:
        try:
            _draw_pngs(run, reports, args.png)
        except (ImportError, ValueError) as error:
            print(f"gradmon summary: {error}", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_DAMAGED if reports[0].damaged else EXIT_OK


def _judge_logdir(args):
    """`(run, reports)` of `args.logdir`; raises `ValueError` (bad thresholds or
    `--max-listed`, no gradmon logs)."""
    thresholds = Thresholds(**{name: getattr(args, name) for name in _THRESHOLD_OPTIONS})
    check_positive_int("max_listed", args.max_listed)
    run = load_run(args.logdir)
    if not is_gradmon_run(run):
        raise NoGradmonLogs(
            f"No gradmon statistics in the event files of {run_directory(args.logdir)!r}. "
            "Expected the `log_dir` of a gradmon.GradientMonitor run."
        )
    return run, health_reports(run, thresholds, grouping=args.grouping)


def _draw_pngs(run, reports, png):
    """`plot` of each report: into `png`, or for several observers one picture each,
    FILE-<name>.png (each path said on stderr)."""
    for report in reports:
        path = png
        if len(reports) > 1:
            stem, ext = os.path.splitext(png)
            path = f"{stem}-{tags.sanitize(report.name or 'unnamed')}{ext or '.png'}"
            print(f"gradmon summary: {report.name or 'unnamed'}: {path}", file=sys.stderr)
        plot(observer_run(run, report.name), report, path)
