"""The one base of every error MemoGuard raises on purpose: hosts and the CLI catch it to show its message
(one clear line) where the user looks, instead of a traceback."""


class MemoGuardError(Exception):
    """A problem with the user's input, files or model that MemoGuard can state in words."""


class ModelLoadError(MemoGuardError, RuntimeError):
    """A model folder or checkpoint file that cannot be loaded, and why."""


class ArgumentError(MemoGuardError, ValueError):
    """A setting out of its range or of the wrong type, named as the user gave it."""
