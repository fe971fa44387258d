"""``python -m thread_store.cli``: the console script, where it is not on PATH."""

from thread_store.cli import main

if __name__ == "__main__":
    main()
