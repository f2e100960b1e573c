"""Privacy guard: keep values a sender controls out of every log line, stderr and error text the node writes.

pydicom quotes element values in its log records and warnings (an invalid UI, IS, DS, CS or DA value;
after one wrong length byte, hundreds of bytes of the following elements: names, IDs, dates), and
exceptions from pydicom, numpy and others quote them in their messages. Filtering at the handlers is
not enough: pydicom resets its logger's level when it is imported, ``pydicom.config.debug()`` adds a
handler of its own, and ``warnings.warn`` prints to stderr without logging. So the guard works where
the text is made, once per process, from :func:`install` (``node.logs.setup_logging`` calls it, so every
process that sets up logging has it: the serve parent, spawned SCP processes, workers):

- a log record factory rewrites every record made in the process, whatever logger, level or handler:
  a record of a library that quotes values (:data:`VALUE_QUOTING_LOGGERS`) gets a value-free text
  (a known message form with its values withheld, or a fixed text with the VRs and dictionary tags it
  names and the code location); an exception passed as the message, as an argument or as ``exc_info``
  is replaced by :func:`describe` (tracebacks keep their frames, which are code, not data);
- ``warnings.showwarning`` is replaced: a warning is logged value-free to ``node.warnings``;
- uncaught exceptions (main thread, other threads, unraisable) are logged through the same path
  instead of being printed with their messages;
- pynetdicom's logging of request and response identifiers (dataset dumps) is switched off.

:func:`describe` is also what code uses to put an exception into a stored reason or error text.
"""

from __future__ import annotations

import errno
import logging
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TextIO

VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom", "py.warnings")
"""Loggers whose every record is rewritten: their texts may quote dataset values. ``py.warnings`` is
what ``logging.captureWarnings`` writes to, should anything turn it on later."""

OWN_PACKAGES = frozenset({"node", "ai", "storage", "training", "bench"})
"""Exceptions defined here keep their message: the project's messages name UIDs, keywords and
paths, never a dataset value (STYLE: errors say what, where, expected, found - without patient data)."""

PASS_THROUGH_WARNINGS: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
"""Warning categories whose text is about code (an API), not about data: kept as written."""

WITHHELD = "text withheld, it may quote element values"
_REPO = Path(__file__).resolve().parent.parent
_THIS_FILE = str(Path(__file__).resolve())
_MAX_TOKENS = 6
_MAX_CHAIN = 5

# Message forms of pydicom (3.x) whose fixed words and constrained parts are safe to show; the
# parts matched by ".*" (the value) are never shown. Anchored, matched on the whole message.
_SAFE_FORMS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.DOTALL), template) for pattern, template in (
        (r"Invalid value for VR (?P<vr>[A-Z]{2}): .*", r"Invalid value for VR \g<vr> (value withheld)"),
        (r"The value length \((?P<n>\d+)\) exceeds the maximum length of (?P<max>\d+) allowed for "
         r"VR (?P<vr>[A-Z]{2})\.",
         r"The value length (\g<n>) exceeds the maximum length of \g<max> allowed for VR \g<vr>"),
        (r"Expected (?P<a>explicit|implicit) VR, but found (?P<b>explicit|implicit) VR - using "
         r"(?P<c>explicit|implicit) VR for reading",
         r"Expected \g<a> VR, but found \g<b> VR - using \g<c> VR for reading"),
        (r"Unknown DICOM tag \((?P<g>[0-9A-Fa-f]{4}),(?P<e>[0-9A-Fa-f]{4})\)( - setting VR to 'UN')?",
         r"Unknown DICOM tag (\g<g>,\g<e>)"),
        (r"Invalid value for VR (?P<vr>[A-Z]{2}) .*", r"Invalid value for VR \g<vr> (value withheld)"),
    )
)
_VR_RE = re.compile(r"\bVR:? '?(?P<vr>[A-Z]{2})\b|\((?P<vr2>[A-Z]{2})\)")
_TAG_RE = re.compile(r"\(\s*(?P<g>[0-9A-Fa-f]{4})\s*,\s*(?P<e>[0-9A-Fa-f]{4})\s*\)")
_STACK_SKIP = ("logging", "warnings")

_installed = False
_lock = threading.Lock()


# --- value-free texts -------------------------------------------------------------------------


def _known_vrs() -> frozenset[str]:
    try:
        from pydicom.valuerep import VR
    except ImportError:  # pragma: no cover - pydicom is a dependency of the node
        return frozenset()
    return frozenset(str(v.value) for v in VR)


def _dictionary_tag(group: str, element: str) -> str | None:
    """``(gggg,eeee) Keyword`` for a tag of pydicom's dictionary, else None (a private or made-up tag)."""
    try:
        from pydicom.datadict import DicomDictionary, keyword_for_tag
    except ImportError:  # pragma: no cover
        return None
    tag = int(group + element, 16)
    if tag not in DicomDictionary:
        return None
    return f"({group.upper()},{element.upper()}) {keyword_for_tag(tag)}".rstrip()


def safe_tokens(text: str) -> list[str]:
    """The VR names and dictionary tags ``text`` mentions: all that is shown of an unknown message.

    A VR name comes from a list of 38, a tag from pydicom's dictionary (and is shown with the
    dictionary's keyword): neither can carry a value a sender chose.
    """
    vrs = _known_vrs()
    found: list[str] = []
    for m in _VR_RE.finditer(text):
        vr = m.group("vr") or m.group("vr2")
        if vr in vrs and f"VR {vr}" not in found:
            found.append(f"VR {vr}")
    for m in _TAG_RE.finditer(text):
        tag = _dictionary_tag(m.group("g"), m.group("e"))
        if tag and tag not in found:
            found.append(tag)
    return found[:_MAX_TOKENS]


def safe_text(text: str) -> str:
    """A value-free rendering of a library's message: a known form with its values withheld, or the
    VRs and dictionary tags it names, or only that it was withheld."""
    stripped = text.strip()
    for pattern, template in _SAFE_FORMS:
        m = pattern.fullmatch(stripped)
        if m:
            return m.expand(template)
    tokens = safe_tokens(stripped)
    return f"{WITHHELD} ({'; '.join(tokens)})" if tokens else WITHHELD


def short_path(filename: str) -> str:
    """A code location's file, relative to site-packages or to the repository (never a data path)."""
    text = str(filename).replace("\\", "/")
    if "/site-packages/" in text:
        return text.rsplit("/site-packages/", 1)[1]
    try:
        return str(Path(text).resolve().relative_to(_REPO))
    except (ValueError, OSError):
        return Path(text).name


def _origin_of(tb: TracebackType | None) -> str | None:
    """``file:line in function`` of the innermost frame of a traceback (code, not data)."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    if not frames:
        return None
    last = frames[-1]
    return f"{short_path(last.filename)}:{last.lineno} in {last.name}"


def _is_own(exc: BaseException) -> bool:
    return type(exc).__module__.split(".", 1)[0] in OWN_PACKAGES


def _os_error_text(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else None
    text = f"[{code}] {exc.strerror}" if code else WITHHELD
    return f"{text}: {exc.filename}" if exc.filename is not None and code else text


def _db_error_text(exc: BaseException) -> str | None:
    """The driver's first message line of a SQLAlchemy DBAPIError ("database is locked"), without
    the statement and its parameters."""
    orig = getattr(exc, "orig", None)
    if orig is None or not type(exc).__module__.startswith("sqlalchemy"):
        return None
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first}"


def message_of(exc: BaseException) -> str:
    """An exception's message when it is safe to show: the project's own as written, any other's
    through :func:`safe_text` (a library message may quote element values)."""
    return str(exc) if _is_own(exc) else safe_text(str(exc))


def describe(exc: BaseException) -> str:
    """A value-free description of an exception, for logs, stored reasons and error texts.

    The project's own exceptions keep their message; an ``OSError`` keeps its error code, text and
    file name (paths the node built); a database error keeps the driver's first line; any other
    exception (pydicom, numpy, pylibjpeg...) keeps only its type, a known message form or the VRs and
    dictionary tags it names, and the code location that raised it. Use it wherever an exception
    from parsing or decoding received data becomes text: ``f"... ({describe(exc)})"`` instead of
    ``f"... ({exc})"``.

    Example: ``ValueError("Invalid value for VR DA: '19700101x'")`` ->
    ``"ValueError: Invalid value for VR DA (value withheld) (at pydicom/valuerep.py:... in ...)"``.
    """
    name = type(exc).__name__
    if _is_own(exc):
        return f"{name}: {exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{name}: {_os_error_text(exc)}"
    text = _db_error_text(exc) or safe_text(str(exc))
    origin = _origin_of(exc.__traceback__)
    return f"{name}: {text}" + (f" (at {origin})" if origin else "")


def describe_traceback(exc: BaseException) -> str:
    """A traceback with its frames (code lines) and every exception of the chain through :func:`describe`."""
    chain: list[tuple[BaseException, str]] = []
    current: BaseException | None = exc
    link = ""
    while current is not None and len(chain) < _MAX_CHAIN:
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    parts: list[str] = []
    for i, (item, _) in enumerate(reversed(chain)):
        if i:
            parts.append("\n\n" + chain[len(chain) - i][1] + "\n\n")
        frames = "".join(traceback.format_list(traceback.extract_tb(item.__traceback__)))
        parts.append(("Traceback (most recent call last):\n" + frames if frames else "") + describe(item))
    return "".join(parts)


# --- log records ------------------------------------------------------------------------------


def _caller_origin() -> str:
    """The code location that made the record, skipping logging, warnings, this module and pydicom's
    ``warn_and_log`` helper (whose own line says nothing)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        path = code.co_filename.replace("\\", "/")
        module = frame.f_globals.get("__name__", "")
        if (module.split(".")[0] not in _STACK_SKIP and path != _THIS_FILE
                and code.co_name != "warn_and_log"):
            return f"{short_path(path)}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back
    return "unknown"


def _library_text(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record must still become a value-free line
        message = ""
    return f"{record.name}: {safe_text(message)} [at {_caller_origin()}]"


def _safe_arg(value: Any) -> Any:
    return describe(value) if isinstance(value, BaseException) else value


def scrub_record(record: logging.LogRecord) -> None:
    """Make ``record`` value-free in place (see the module docstring for the rules)."""
    if record.name.split(".")[0] in VALUE_QUOTING_LOGGERS or record.name in VALUE_QUOTING_LOGGERS:
        record.msg, record.args = _library_text(record), ()
    else:
        if isinstance(record.msg, BaseException):
            record.msg = describe(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_safe_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _safe_arg(v) for k, v in record.args.items()}
    exc_info = record.exc_info
    if isinstance(exc_info, tuple) and exc_info[1] is not None:
        record.exc_text = describe_traceback(exc_info[1])
        record.exc_info = None


def _wrap_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            scrub_record(record)
        except Exception:  # never let the guard break logging; never let text through
            record.msg, record.args, record.exc_info = f"{record.name}: log record withheld ({WITHHELD})", (), None
            record.exc_text = None
        return record

    make_record.privacy_guard = True  # type: ignore[attr-defined]
    return make_record


# --- warnings and uncaught exceptions ---------------------------------------------------------


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """``warnings.showwarning``: log the warning value-free instead of printing its text."""
    text = str(message) if issubclass(category, PASS_THROUGH_WARNINGS) else safe_text(str(message))
    logging.getLogger("node.warnings").warning("%s: %s [at %s:%d]", category.__name__, text,
                                               short_path(filename), lineno)


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("node").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    logging.getLogger("node").critical("uncaught exception in thread %s", name,
                                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisable_hook(args: Any) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("node").error("unraisable exception in a %s", type(args.object).__name__,
                                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _quiet_pynetdicom() -> None:
    """pynetdicom logs request/response identifiers (whole datasets) when these are on."""
    try:
        from pynetdicom import _config
    except ImportError:  # pragma: no cover - pynetdicom is a dependency of the node
        return
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def install() -> None:
    """Install the guard in this process (idempotent); call it before anything logs.

    Imports ``pydicom.config`` first so that its import-time logger reset has already happened.
    """
    global _installed
    with _lock:
        if not getattr(logging.getLogRecordFactory(), "privacy_guard", False):
            logging.setLogRecordFactory(_wrap_factory(logging.getLogRecordFactory()))
        if _installed:
            return
        import pydicom.config  # noqa: F401 - its import resets the "pydicom" logger's level

        warnings.showwarning = _show_warning
        sys.excepthook = _excepthook
        threading.excepthook = _thread_excepthook
        sys.unraisablehook = _unraisable_hook
        _quiet_pynetdicom()
        _installed = True
