"""One exception type for every user-facing problem, so the CLI can print it as one line."""


class MetalforgeError(Exception):
    """A problem with the user's input or environment, worded to be shown as is."""


def choices(values) -> str:
    """Format valid choices for an error message."""
    return ", ".join(str(v) for v in values)
