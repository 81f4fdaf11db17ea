"""The one base of tuneflow's own errors: a problem said in one line, and the exit status the command line gives it.

Every error a user can act on derives from `TuneflowError`; `tuneflow` (tuneflow/cli/main.py) catches it once and
prints `tuneflow: <message>`. Exit status 2: the input or the set-up is wrong (a config, a dataset, a server that
refuses the credentials), nothing ran; 1: a run that started failed.
"""

from __future__ import annotations


class TuneflowError(Exception):
    exit_code = 2


class RunFailed(TuneflowError):
    """A run that started and failed: a training rank, a node, a training flow run."""

    exit_code = 1
