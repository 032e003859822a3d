"""`python -m foresight.cli`: the same commands as the `foresight` console script."""

from foresight.cli import main

main()
