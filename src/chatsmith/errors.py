"""User-facing errors: the CLI prints these as one clear line (no traceback) and exits with status 2."""


class ChatsmithError(Exception):
    """Bad input or settings. The message names the file, line or field and what was expected."""


class DataError(ChatsmithError):
    """A data file (or a row in it) is not what chatsmith expected."""


class TemplateError(ChatsmithError):
    """A chat template cannot be rendered or masked faithfully."""
