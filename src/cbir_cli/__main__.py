"""``python -m cbir_cli`` = ``cbir``."""

from .cli import main

main()
