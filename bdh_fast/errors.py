"""The one exception type for mistakes a user can make (bad flag values, bad paths, bad checkpoints),
and the one warning line for an optional part that failed.

Entry points catch UserError, print one line `error: <message>` to stderr and exit with status 2.
"""

import sys


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix, on one line."""


def warn_part_off(part: str, error: BaseException | str, consequence: str = "it is off for the rest of the run") -> None:
    """One stderr line: an optional part (probes, the memory snapshot, the profiler, NVML, ...) failed.

    DESIGN.md invariant 9: such a failure never ends a training run; the caller switches the part off
    (or to its fallback) and calls this once.
    """
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    reason = " ".join(str(reason).split())[:500]  # one line, even for a multi-line compiler error
    print(f"warning: {part} failed ({reason}); {consequence}; training goes on", file=sys.stderr, flush=True)
