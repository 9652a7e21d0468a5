"""Fuzzing every op's arguments (ranks, dtypes, strides, sizes, value ranges, scalar types).

Hypothesis draws call specs (tests/ops/fuzz_ops.py); each call runs in a worker process with a
per-call time limit, so a crash or a hang fails the test (with the spec to replay) instead
of killing pytest. Every call must either succeed and match the reference or raise
ValueError/RuntimeError naming an argument. The standalone run with many more calls is
``python tests/ops/fuzz_ops.py --calls 10000``.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fuzz_ops import OPS, Worker, draw_spec


class HypothesisDraw:
    """fuzz_ops' draw interface over hypothesis' data object (so failures shrink)."""

    def __init__(self, data, only_op=None):
        self.data = data
        self.only_op = only_op

    def choice(self, options):
        options = list(options)
        if self.only_op is not None and options == list(OPS):
            return self.only_op
        return self.data.draw(st.sampled_from(options))

    def integer(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))


@pytest.fixture(scope="module")
def worker():
    w = Worker(per_call_seconds=20.0)
    yield w
    w.close()


@pytest.mark.parametrize("op", OPS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_op_arguments(op, worker, data):
    spec = draw_spec(HypothesisDraw(data, only_op=op))
    outcome, detail = worker.run(spec)
    assert outcome == "ok", f"{outcome}: {detail}\nreplay: python tests/ops/fuzz_ops.py --spec '{json.dumps(spec)}'"


def test_harness_reports_crash_and_hang(tmp_path):
    # The harness itself: a worker that dies or stalls is reported, and the next call
    # gets a fresh worker.
    w = Worker(per_call_seconds=3.0)
    try:
        assert w.run({"op": "__crash__"})[0] == "crash"
        assert w.run({"op": "__hang__"})[0] == "hang"
        spec = {"op": "__ok__"}
        assert w.run(spec) == ("ok", "harness self-test")
    finally:
        w.close()
