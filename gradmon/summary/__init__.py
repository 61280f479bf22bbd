"""Reading a run back, behind `gradmon summary`: event files (`events`), the health
judgement and its text, JSON and PNG renderings (`report`). TensorFlow-free."""

from gradmon.summary.events import Run, load_run  # noqa: F401
from gradmon.summary.report import (  # noqa: F401
    HealthReport,
    Thresholds,
    format_markdown,
    format_table,
    health_report,
    health_reports,
    to_json,
)
