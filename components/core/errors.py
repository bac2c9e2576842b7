"""The one exception type for errors a user can fix: every driver prints it without a traceback."""


class UserError(Exception):
    """An error the user can fix (bad input, missing file); printed without a traceback."""
