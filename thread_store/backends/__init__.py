"""Storage backends. Each package here owns its driver, its SQL, its locks, its files and
its one error boundary; nothing outside ``backends/`` imports a database driver
(``tests/test_layers.py`` checks it)."""
