"""The version of lm (SemVer; CHANGELOG.md says what each one changed). pyproject.toml repeats it,
and tests/test_versions.py checks the two agree. Its own module so that any part of lm can read it
without importing the package's __init__ (checkpoints record it)."""

__version__ = "0.1.0"
