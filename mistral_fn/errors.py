"""Project exceptions: user-facing failures carry a one-line message naming the culprit."""


class MistralFnError(Exception):
    """Base class for every error the project raises on purpose (bad input, bad files, bad flags)."""


class ConfigError(MistralFnError, ValueError):
    """An invalid or unsupported model/parallel configuration."""


class CheckpointError(MistralFnError):
    """A checkpoint that is missing, corrupt, or does not match the configuration."""


class InputError(MistralFnError, ValueError):
    """Bad runtime input: tokens outside the vocabulary, wrong batch shapes, malformed data rows."""


class DivergenceError(MistralFnError):
    """Training stopped: too many consecutive steps with a non-finite loss or gradient norm."""


class DeviceError(MistralFnError, RuntimeError):
    """A requested device (or its runtime: CUDA, torch_npu/CANN) that is not available here."""
