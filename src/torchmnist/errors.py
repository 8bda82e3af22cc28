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
