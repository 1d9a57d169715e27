"""One exception type for every user-facing problem: its message names the problem and the fix."""


class BoaError(ValueError):
    pass
