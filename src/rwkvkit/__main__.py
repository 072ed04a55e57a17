"""``python -m rwkvkit``: the same as the ``rwkvkit`` command."""

from .cli import entry

if __name__ == "__main__":
    entry()
