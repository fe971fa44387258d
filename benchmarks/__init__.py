"""Side-by-side benchmarks of thread_store against raw SQLite floors and the eventsourcing peer.

Run ``python -m benchmarks --quick`` (or ``thread-store bench``); see benchmarks/README.md.
"""
