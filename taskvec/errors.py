"""One base class for the errors taskvec raises on bad input, so callers (and the CLI) can tell
them from bugs: a TaskvecError is the user's to fix and its message says how."""


class TaskvecError(Exception):
    """Bad input: an unknown model or task, a malformed file, an invalid setting."""


class SettingError(TaskvecError, ValueError):
    """An experiment setting, prompt format or prompt file that cannot be used."""


def positive_int(name: str, value) -> int:
    """``value`` when it is an integer >= 1 (not a bool), else a SettingError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"{name} must be an integer >= 1, got {value!r}")
    return value
