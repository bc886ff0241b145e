"""One base class for the errors taskvec raises on bad input, so callers (and the CLI) can tell
them from bugs: a TaskvecError is the user's to fix and its message says how."""


class TaskvecError(Exception):
    """Bad input: an unknown model or task, a malformed file, an invalid setting."""


class SettingError(TaskvecError, ValueError):
    """An experiment setting, prompt format or prompt file that cannot be used."""
