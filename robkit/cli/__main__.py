"""``python -m robkit.cli``: the same as the ``robkit`` command."""

from robkit.cli import main

main()
