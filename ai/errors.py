"""Error types shared by the node and the model runtime; the type decides whether a job is retried."""

from __future__ import annotations

# Interpreter-level exits that no job or decoder may swallow: every other BaseException a job raises
# (pyo3's PanicException, raised by a Rust decoder plug-in, derives from BaseException) is a failure of
# that job, never of the process.
PROCESS_EXITS: tuple[type[BaseException], ...] = (KeyboardInterrupt, SystemExit, GeneratorExit)


class ConfigError(ValueError):
    """A configuration (the node's ``node.toml``, a training run's or the gate's) is invalid; ``problems`` lists
    each as 'key: expected ..., found ...'."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = problems
        super().__init__(f"{source} is invalid:\n  " + "\n  ".join(problems))


class CxrError(Exception):
    """Base of the project's own errors."""


class RetryableError(CxrError):
    """A transient failure (peer down, database locked, resource busy): try again later."""


class PermanentError(CxrError):
    """A failure that will not go away on retry (undecodable pixels, invalid object, rejected send)."""


class UnsupportedImage(PermanentError):  # noqa: N818 (name fixed by docs/contracts.md)
    """The image cannot be analysed: decoding, photometric interpretation, geometry or field detection."""


class ImageRefused(PermanentError):  # noqa: N818 (a verdict, not a malfunction)
    """The input gate refused the image (``ai.gate``): not a frontal chest radiograph, or no usable content.

    Attributes:
        reason: the fixed, value-free text the "not analysed" SR carries.
        image: the decoded image (float32 [0, 1]) the gate looked at, for the not-analysed overlay.
    """

    def __init__(self, reason: str, image: object = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.image = image


class ModelPackageError(PermanentError):
    """The model package is unusable: missing manifest or member, checksum mismatch, invalid manifest."""
