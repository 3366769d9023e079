"""The one error type users see: a one-line message, a non-zero exit, nothing half-written."""


class M2DError(Exception):
    """Bad input or an impossible request. The CLI prints `m2d: error: <message>` and exits with status 2."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line (libraries' messages often put the useful part on line two)."""
    text = " ".join(str(exc).split())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
