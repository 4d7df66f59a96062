"""Research tooling: labelled datasets, the fresh-scene producer, the study runner, diagnostics,
their scripts and result curves. Studies import the product; the product never imports
studies (ARCHITECTURE.md; ``tests/test_architecture.py`` checks it). Run from the repository
root, e.g. ``python -m studies.study --help``."""
