"""What the command-line tests share: the tiny MNIST config, the console script and ``--set`` lists.

``TINY`` is ``configs/tiny.yaml`` (a seconds-long run); ``SMALL`` the overrides that shrink it
further for the CLI tests; ``sets(["a=1", "b=2"])`` gives ``["--set", "a=1", "--set", "b=2"]``.
Import it in tests with ``from cli_runs import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
SCRIPT = Path(sys.executable).parent / "twinflow"
SMALL = ["data.limit=64", "device=cpu", "sampling.per_class=1"]


def sets(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]
