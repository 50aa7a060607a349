"""The one error type for user mistakes; the CLI reports it as a short message and exit status 2."""


class UserError(Exception):
    """A mistake the user can fix: a bad argument, a missing file, an unknown name.

    `message` names the problem and, where it fits in one line, the fix; `hint` is an optional second line.
    Lower layers raise it instead of printing or exiting, so they stay usable outside the CLI.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library messages can run to paragraphs), or its type's name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
