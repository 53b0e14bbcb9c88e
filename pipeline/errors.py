"""The one error type the library raises for bad input.

pipeline/ and stages/ raise ProtoquantError with a message that names the file, the option and the
fix; only cli.py turns it into a printed line and an exit code.
"""


class ProtoquantError(Exception):
    """Bad input, a mismatched artefact, or an incomplete store: the message says what to do."""
