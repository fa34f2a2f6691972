"""Shared test helpers (tests/helpers/) are importable by module name from every test directory."""

import sys
from pathlib import Path

HELPERS = str(Path(__file__).parent / "helpers")
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)
