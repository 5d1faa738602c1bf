"""Network-namespace test helper: ``examples/netlab.py`` (shared with the demos), plus
:func:`require_netns`, which skips locally and fails under ``CI=true``.

See ``examples/netlab.py`` for what a lab creates and how it is torn down.
"""

from __future__ import annotations

import pytest

from examples.netlab import (
    NetnsLab,
    Output,
    RegistryInNs,
    netns_lab,
    netns_unavailable,
    run_cmd,
)
from tests.support import IN_CI

__all__ = ["NetnsLab", "Output", "RegistryInNs", "netns_lab", "require_netns", "run_cmd"]


def require_netns(kind: str = "nat") -> None:
    """Skip (locally) or fail (CI, where .ci/run installs the tools and runs as root)
    unless this is root with ``ip``, ``nft`` and namespaces."""
    why = netns_unavailable(kind)
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"network namespace tests must run in CI: {why}")
    pytest.skip(why)
