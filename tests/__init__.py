"""Test suite (a package, so helper imports such as ``tests.test_stage`` name one module)."""
