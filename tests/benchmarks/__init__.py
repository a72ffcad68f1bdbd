"""Performance benchmarks for issue 5; not part of the default test run (`python -m tests.benchmarks.run`)."""
