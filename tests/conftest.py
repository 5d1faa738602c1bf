from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, settings

# Bytecode caches (gitignored __pycache__) even under PYTHONDONTWRITEBYTECODE=1: without
# them each run re-rewrites every test module (~3 s) and each of the ~100 registry and
# student processes the suite starts recompiles the package it imports (~70 ms each).
sys.dont_write_bytecode = False

# CI runs more examples; local runs stay quick.
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")
