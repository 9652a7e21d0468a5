"""python -m did_engine ... == did-engine ..."""

import sys

from did_engine.cli import main

sys.exit(main())
