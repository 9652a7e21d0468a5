"""matplotlib is optional (the `plot` extra): plots are skipped with a note without it."""

from __future__ import annotations

import sys


def pyplot(what: str):
    """matplotlib.pyplot on the Agg backend, or None (after a note on stderr naming `what`,
    the plot that is skipped) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, so {what} is not drawn "
              "(pip install 'did_engine[plot]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
