"""``python -m coordkit``: the ``coordkit`` command."""

from coordkit._cli import main

main()
