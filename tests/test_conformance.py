"""The backend protocol's contract, run against both backends."""

from __future__ import annotations

import pytest

from coordkit.testing import CONFORMANCE_CHECKS, Harness
from coordkit.testing._conformance import Check

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("check", list(CONFORMANCE_CHECKS.values()), ids=list(CONFORMANCE_CHECKS))
async def test_conformance(harness: Harness, check: Check) -> None:
    await check(harness)
