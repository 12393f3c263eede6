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


class GuardrailRefusal(GenlabError):
    """A guardrail refused a text (an input, a retrieved passage or an output); `verdict` says which check and why."""

    def __init__(self, verdict, stage: str):
        self.verdict, self.stage = verdict, stage
        why = "; ".join(dict.fromkeys(f"{f.check}: {f.reason}" for f in verdict.findings if f.action == "refuse"))
        super().__init__(f"refused by the guardrails ({stage}): {why}")
