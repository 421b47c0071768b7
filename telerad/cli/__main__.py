"""``python -m telerad.cli``."""

from telerad.cli import main

main()
