"""The one base class of errors the user can fix (a bad param, file, image or URI).

The CLI prints such an error as one line and exits 2; any other exception is a
bug and keeps its traceback (with `-v`, every error does). Subclasses of
`ValueError` so callers that catch ValueError keep working.
"""


class UserError(ValueError):
    """Bad input: the message names the bad value and what is allowed."""
