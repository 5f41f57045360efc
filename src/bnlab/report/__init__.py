"""Reports regenerated from run directories: ``report.md`` and self-contained ``report.html``."""

from .collect import Group, Run, find_runs, group_runs, load_runs, mean_sd
from .render import table_rows, verdict, write_report

__all__ = [
    "Group",
    "Run",
    "find_runs",
    "group_runs",
    "load_runs",
    "mean_sd",
    "table_rows",
    "verdict",
    "write_report",
]
