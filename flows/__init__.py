"""Prefect flows: thin compositions of library calls (the logic lives in foresight/ and privacy/)."""
