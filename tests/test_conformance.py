"""The backend protocol's contract, run against every backend the ``harness`` fixture gives, with the same runner
a third-party backend uses (`coordkit.testing.conformance_tests`)."""

from __future__ import annotations

from coordkit.testing import conformance_tests

test_conformance = conformance_tests("harness")
