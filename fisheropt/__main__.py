"""``python -m fisheropt ...`` is the ``fisheropt`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
