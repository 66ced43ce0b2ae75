"""The one exception type for mistakes a user can fix.

The CLI turns a :class:`UserError` into a single message on stderr and exit code 2, with no
traceback: a bad recipe, missing data or a mismatched checkpoint is not a bug in hashdistill.
"""


class UserError(Exception):
    """A problem with the user's input (recipe, data, checkpoint, path), with a clear message."""
