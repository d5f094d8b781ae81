"""User-facing errors: the CLI prints these as one clear line (no traceback) and exits with status 2;
an interruption (`Interrupted`) is printed the same way and exits with 128 + the signal number."""


class ChatsmithError(Exception):
    """Bad input or settings. The message names the file, line or field and what was expected."""


class DataError(ChatsmithError):
    """A data file (or a row in it) is not what chatsmith expected."""


class TemplateError(ChatsmithError):
    """A chat template cannot be rendered or masked faithfully."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a command. ``message`` says what was kept (a checkpoint or not);
    the CLI prints it and exits with ``exit_code`` (128 + the signal number: 130, 143)."""

    def __init__(self, signum: int = 2, message: str | None = None):
        super().__init__(message or "interrupted")
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
