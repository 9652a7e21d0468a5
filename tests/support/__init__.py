"""Plain helper modules shared by the test folders, imported as ``support.<module>`` (pytest
puts tests/ on sys.path, since tests/ itself is not a package)."""

import os

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(TESTS_DIR)
BD3LM_FIXTURE = os.path.join(TESTS_DIR, "fixtures", "bd3lm_tiny")  # the public BD3-LM code's reference data
