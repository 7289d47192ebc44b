"""The three drivers: single-process (`single`), the SID pipeline (`sid`) and the BP
pipeline (`bp`), started by `launch`; `run` (dispatch.py) picks one for a config, after
checking the run directory's lifecycle (rundir.py)."""

from sidpipe.drivers.dispatch import run

__all__ = ["run"]
