"""Reading a run back, behind `gradmon summary`, TensorFlow-free: event files (`events`),
what a report holds (`health`), the numbers of a run (`series`, `analysis`), the judgement
(`judgement`), its text, Markdown and JSON (`render`) and PNG (`plot`) renderings, the
command line (`cli`); `report` re-exports their public names and states the rules."""

from gradmon.summary.events import Run, load_run  # noqa: F401
from gradmon.summary.health import HealthReport, Thresholds  # noqa: F401
from gradmon.summary.judgement import health_report, health_reports  # noqa: F401
from gradmon.summary.render import format_markdown, format_table, to_json  # noqa: F401
