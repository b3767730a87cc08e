"""The error tree. The CLI prints one line for a SafeExportError and exits non-zero."""


class SafeExportError(Exception):
    """Base of every error the user can cause and fix."""


class ConfigError(SafeExportError):
    """A flag, config value or run directory that cannot be used as given."""


class DataError(SafeExportError):
    """A dataset that is missing, malformed or too small."""


class ExportError(SafeExportError):
    """An export that cannot be produced or does not match its source model."""


class DeviceError(SafeExportError):
    """A runtime or device that cannot run the model."""


class TrainingError(SafeExportError):
    """Training that cannot go on (the loss became NaN or infinite)."""
