"""Errors that end a run with one clear sentence instead of a traceback.

Raise one of these with a sentence that says what is wrong and, where it helps, what to do.
The CLI prints it on stderr and exits with the class's status.
"""


class TorchMnistError(Exception):
    exit_code = 1
    label = "error"  # the CLI prints "torchmnist: <label>: <message>"
    told = True  # False: another process tells the user (a sweep, of its workers' stops)


class UsageError(TorchMnistError):
    """A bad flag value, missing or corrupt data, or an unreadable checkpoint: exit 2."""

    exit_code = 2


class TrainingError(TorchMnistError):
    """Training cannot go on (a diverged loss, a checkpoint that cannot be written): exit 1."""

    exit_code = 1


def counted(n: float, noun: str) -> str:
    """"1 trial", "3 trials", "0.75 epochs": a count as a sentence says it."""
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


def printable(text: str) -> str:
    """`text` as one line that cannot drive a terminal: in a file name, bytes that are not
    UTF-8 (caf\\xe9.png from another system), a newline, a tab or an escape sequence (a name
    made to recolour or clear the screen) are shown as backslash escapes."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def is_utf8(text: str) -> bool:
    """Whether text can be written as UTF-8: a file name in another encoding reaches Python
    with its bytes kept as lone surrogates ("caf\\udce9.png"), which no UTF-8 file holds."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
