"""``python -m rwkvkit``: the same as the ``rwkvkit`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
