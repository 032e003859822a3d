"""Tools for maintainers: checks on the shape of the code itself (``python -m foresight.devtools.layers``)."""
