"""``twinflow train --dry-run`` in the test process, with the plan it printed (tests/test_preflight.py,
tests/test_full_width.py). Import it with ``from dry_runs import dry_run`` (pytest puts ``tests/``
on ``sys.path``)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import twinflow.train.preflight as preflight_module
from twinflow.cli import main
from twinflow.train.preflight import PreflightPlan


def dry_run(config: Path, out: Path, *options: str) -> tuple[int, str, str, PreflightPlan | None]:
    """``twinflow train --config CONFIG --out OUT --dry-run OPTIONS``: exit code, stdout, stderr
    and the plan the command printed (None when it failed)."""
    plans, stdout, stderr = [], io.StringIO(), io.StringIO()
    original = preflight_module.preflight

    def keep(*args, **kwargs):
        plans.append(original(*args, **kwargs))
        return plans[-1]

    preflight_module.preflight = keep
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(["train", "--config", str(config), "--out", str(out), "--dry-run", *options])
    finally:
        preflight_module.preflight = original
    return code, stdout.getvalue(), stderr.getvalue(), plans[0] if plans else None
