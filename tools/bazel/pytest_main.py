"""Runs pytest on the test files given as arguments: the `main` of every py_test in //:BUILD."""

import sys

import pytest

if __name__ == "__main__":
    # The runfiles tree is read-only: no .pytest_cache.
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", *sys.argv[1:]]))
