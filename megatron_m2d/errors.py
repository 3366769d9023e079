"""The one error type users see: a one-line message, a non-zero exit, nothing half-written."""


class M2DError(Exception):
    """Bad input or an impossible request. The CLI prints `m2d: error: <message>` and exits with status 2."""
