"""Reports regenerated from run directories: ``report.md`` and self-contained ``report.html``."""

from .collect import Group, Run, find_runs, group_runs, load_runs, mean_sd
from .page import ReportPaths
from .render import RunReport, run_report, table_rows, verdict, write_report

__all__ = [
    "Group",
    "Run",
    "find_runs",
    "group_runs",
    "load_runs",
    "mean_sd",
    "ReportPaths",
    "RunReport",
    "run_report",
    "table_rows",
    "verdict",
    "write_report",
]
