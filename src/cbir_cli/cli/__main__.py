"""``python -m cbir_cli.cli`` = ``cbir``."""

from . import main

main()
