"""Accuracy studies of SID against backprop: `sidpipe accuracy` or
`python -m sidpipe.bench.accuracy`. The command is study.py (its docstring is the help);
plan.py lists a study's runs, run.py trains them, stats.py, report.py and plots.py turn
their rows into tables, findings and plots."""

from sidpipe.bench.accuracy.study import main, parse

__all__ = ["main", "parse"]
