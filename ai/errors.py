"""Error types shared by the node and the model runtime; the type decides whether a job is retried."""

from __future__ import annotations


class CxrError(Exception):
    """Base of the project's own errors."""


class RetryableError(CxrError):
    """A transient failure (peer down, database locked, resource busy): try again later."""


class PermanentError(CxrError):
    """A failure that will not go away on retry (undecodable pixels, invalid object, rejected send)."""


class UnsupportedImage(PermanentError):  # noqa: N818 (name fixed by docs/contracts.md)
    """The image cannot be analysed: decoding, photometric interpretation, geometry or field detection."""


class ModelPackageError(PermanentError):
    """The model package is unusable: missing manifest or member, checksum mismatch, invalid manifest."""
