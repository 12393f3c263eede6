"""User-facing errors. The CLI turns a `GenlabError` into one line on stderr and exit code 2."""


class GenlabError(Exception):
    """A problem with the user's input (config, data, checkpoint, arguments): message says what and how to fix."""


class ConfigError(GenlabError, ValueError):
    """An unknown key, a wrong type or an out-of-range value in a config or an argument."""


class DataError(GenlabError):
    """A data source that is missing, empty, undecodable or of the wrong shape."""


class CheckpointError(GenlabError):
    """A run folder or checkpoint that is missing, truncated, corrupt or incompatible."""


class TrainingDiverged(GenlabError):
    """The loss became NaN/inf; the last good checkpoint is kept."""
