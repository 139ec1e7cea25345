"""The one exception type for mistakes a user can make (bad flag values, bad paths, bad checkpoints).

Entry points catch it, print one line `error: <message>` to stderr and exit with status 2.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix, on one line."""
