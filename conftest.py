"""Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (default: "default", or "ci" when CI is set).

- default: few examples, so the whole suite runs in two to four minutes on two cores;
- ci: the same budget, derandomized, so a red run can be repeated exactly;
- heavy: many more examples, for a thorough pass (`HYPOTHESIS_PROFILE=heavy pytest`).
A counterexample Hypothesis finds belongs in the test as an explicit @example.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=25, deadline=None)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("heavy", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))
