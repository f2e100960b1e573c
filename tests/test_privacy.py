"""No patient values anywhere the node writes: logs, stderr, database texts, ``status``, results' free text.

Unique markers are planted in every attribute a sender controls (patient, study, series, equipment,
coded entries), inside invalid UI/IS/DS/CS/DA values, and behind one wrong length byte that makes
pydicom read the patient module as part of Modality; the hostile cases go through a real node
(``cxr-node serve`` as a process, a pynetdicom SCU as the modality) and every output is searched.
Letter markers (``ZQX...``) cannot occur in UIDs; digit markers are looked for as whole values.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from node.config import FilterSettings
from node.filter import FilterRules, decide
from node.privacy import describe, safe_text
from tests.conftest import REPO, free_port
from tests.peers import wait_for

# The datasets are hostile on purpose: pydicom's warnings about them in this process are expected.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
CASES = "ABCDEFGHIJ"
# Text attributes a sender controls, with the marker suffix planted in each (marker = ZQX + case + suffix).
TEXT_ATTRIBUTES = {
    "PatientName": "PNAME", "PatientID": "PID", "OtherPatientIDs": "OPID", "OtherPatientNames": "OPNAME",
    "IssuerOfPatientID": "ISSUER", "PatientAddress": "PADDR", "PatientMotherBirthName": "MOTHER",
    "PatientComments": "PCOMM", "AdditionalPatientHistory": "HIST", "AccessionNumber": "ACC",
    "ReferringPhysicianName": "REFPHYS", "PerformingPhysicianName": "PERFPHYS", "OperatorsName": "OPER",
    "InstitutionName": "INST", "InstitutionAddress": "INSTADDR", "StationName": "STATION",
    "StudyDescription": "STUDYDESC", "SeriesDescription": "SERDESC", "ProtocolName": "PROTO",
    "StudyID": "STUDYID", "RequestedProcedureDescription": "REQPROC", "DeviceSerialNumber": "SERIAL",
    "AcquisitionDeviceProcessingDescription": "ADPD", "PatientTelephoneNumbers": "PHONE",
}


def marker(case: str, suffix: str) -> str:
    return f"ZQX{case}{suffix}"


def digits(case: str, n: int) -> str:
    """An 8-digit marker for DA/numeric fields, unique per case and field: 73 + case + field + 19."""
    return f"73{ord(case) - ord('A'):02d}{n:02d}19"


def appears_as_value(value: str, text: str) -> bool:
    from tests.test_e2e import appears_as_value as as_value

    return as_value(value, text)


# --- the hostile cases ------------------------------------------------------------------------


@dataclass
class Case:
    """One dataset to send (``raw`` bytes for a malformed encoding) and every marker planted in it."""

    name: str
    ds: Dataset
    letters: list[str] = field(default_factory=list)
    numbers: list[str] = field(default_factory=list)
    raw: bytes | None = None


def base_dataset(case: str) -> Case:
    """A CR chest image with a marker in every text attribute and digit markers in the dates."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = UID(CR_IMAGE), generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = UID(CR_IMAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    c = Case(case, ds)
    for keyword, suffix in TEXT_ATTRIBUTES.items():
        value = marker(case, suffix)
        setattr(ds, keyword, f"{value}^{value}GIVEN" if keyword.endswith("Name") and "Institution" not in keyword
                and "Station" not in keyword and "Protocol" not in keyword else value)
        c.letters.append(value)
    for n, keyword in enumerate(("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate")):
        setattr(ds, keyword, digits(case, n))
        c.numbers.append(digits(case, n))
    ds.SeriesNumber, ds.InstanceNumber = digits(case, 10), digits(case, 11)
    c.numbers += [digits(case, 10), digits(case, 11)]
    ds.PatientSex, ds.PatientAge = "F", "042Y"
    rows = cols = 256
    yy, xx = np.mgrid[0:rows, 0:cols]
    pixels = (2000 + 1500 * np.sin(xx / 20.0) * np.cos(yy / 30.0)).astype(np.uint16)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return c


def plant(c: Case, keyword: str, value: str) -> None:
    """Set ``keyword`` to ``value`` as the raw bytes a sender would put (no conversion, no validation)."""
    number = tag_for_keyword(keyword)
    assert number is not None, keyword
    tag = Tag(number)
    data = value.encode("ascii")
    data += b"\0" if dictionary_VR(tag) == "UI" and len(data) % 2 else b" " * (len(data) % 2)
    c.ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(data), data, 0, False, True)
    c.letters.append(value.split()[-1].split(".")[-1])


def hostile_cases() -> list[Case]:
    """Frontal, lateral, other body part, odd modality, invalid VRs, coded entries, wrong length, bad pixels."""
    cases = []
    a = base_dataset("A")  # a frontal chest: analysed (or a "not analysed" SR)
    plant(a, "BodyPartExamined", f"CHEST {marker('A', 'BPE')}")
    cases.append(a)
    b = base_dataset("B")  # lateral by a rule term followed by a marker
    plant(b, "ViewPosition", f"LL {marker('B', 'VP')}")
    cases.append(b)
    c = base_dataset("C")  # body part that is no rule term at all
    plant(c, "BodyPartExamined", marker("C", "BPE"))
    cases.append(c)
    d = base_dataset("D")  # modality that is no defined term
    plant(d, "Modality", marker("D", "MOD"))
    cases.append(d)
    e = base_dataset("E")  # invalid UI, IS, DS, CS, DA values that pydicom quotes
    plant(e, "FrameOfReferenceUID", f"1.2.{marker('E', 'UI')}")
    plant(e, "PatientWeight", marker("E", "DS"))
    plant(e, "PatientSize", f"1.{marker('E', 'DSB')}")
    plant(e, "PatientSex", f"F {marker('E', 'CS')}")
    plant(e, "Laterality", marker("E", "LAT"))
    plant(e, "AcquisitionNumber", marker("E", "IS"))
    plant(e, "ContentDate", "7319528")  # 7 digits: an invalid DA
    e.letters.remove("7319528")
    e.numbers.append("7319528")
    cases.append(e)
    f = base_dataset("F")  # codes and species with markers in code values and meanings
    f.ds.BodyPartExamined = ""
    f.ds.ViewPosition = ""
    f.ds.AnatomicRegionSequence = [code("99" + marker("F", "ARS"), marker("F", "ARV"), marker("F", "ARM"))]
    f.ds.ViewCodeSequence = [code("99LOCAL", marker("F", "VCV"), f"postero-anterior {marker('F', 'VCM')}")]
    f.letters += [marker("F", s) for s in ("ARS", "ARV", "ARM", "VCV", "VCM")]
    cases.append(f)
    g = base_dataset("G")
    g.ds.PatientSpeciesDescription = f"CANIS {marker('G', 'SPEC')}"
    g.ds.PatientSpeciesCodeSequence = [code("99" + marker("G", "SPS"), marker("G", "SPV"), marker("G", "SPM"))]
    g.letters += [marker("G", s) for s in ("SPEC", "SPS", "SPV", "SPM")]
    cases.append(g)
    cases.append(wrong_length_case(base_dataset("H")))
    i = base_dataset("I")  # pixel data shorter than Rows x Columns: the decode fails
    i.ds.PixelData = i.ds.PixelData[: len(i.ds.PixelData) // 3]
    cases.append(i)
    j = base_dataset("J")  # an invalid NumberOfFrames on a single-frame image
    plant(j, "NumberOfFrames", marker("J", "NOF"))
    cases.append(j)
    return cases


def code(scheme: str, value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = scheme[:16], value, meaning
    return item


def wrong_length_case(c: Case) -> Case:
    """One wrong length: Modality's 2 becomes the distance to BodyPartExamined, so pydicom reads the
    institution and patient elements (names, IDs, birth date) as the Modality value and quotes it."""
    buf = BytesIO()
    c.ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    header = b"\x08\x00\x60\x00CS\x02\x00"
    start = data.index(header) + len(header)
    end = data.index(b"\x18\x00\x15\x00CS")  # (0018,0015) BodyPartExamined
    length = end - start
    assert length % 2 == 0 and length < 0x10000
    c.raw = data[: start - 2] + length.to_bytes(2, "little") + data[start:]
    c.ds = pydicom.dcmread(BytesIO(c.raw))  # lazily read: written back with the same (wrong) layout
    return c


# --- outputs ----------------------------------------------------------------------------------


def leaks(case: Case, outputs: dict[str, str]) -> list[str]:
    """``marker in output`` for every planted marker found in any output."""
    found = []
    for where, text in outputs.items():
        found += [f"{m} in {where}" for m in case.letters if m in text]
        found += [f"{m} in {where}" for m in case.numbers if appears_as_value(m, text)]
    return found


def database_texts(db: Path) -> dict[str, str]:
    """Every text value of every table, as ``table.column`` -> joined text."""
    out: dict[str, str] = {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')  # names from sqlite_master
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, str):
                        key = f"database {table}.{column}"
                        out[key] = out.get(key, "") + "\n" + value
    return out


def metrics_text(folder: Path) -> str:
    """What /metrics would serve from the counters every node process wrote (prometheus_client's files)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    text = generate_latest(registry).decode()
    assert "cxr_images_received_total" in text, "the node's processes should have counted what they received"
    return text


def sr_free_text(ds: Dataset) -> str:
    """The SR's own free text: content items (text, code meanings, names) at any depth, and descriptions."""
    parts = [str(ds.get(k, "")) for k in ("SeriesDescription", "ContentDescription", "ContentLabel")]
    for item in ds.get("ContentSequence", []):
        for keyword in ("TextValue", "PersonName", "DateTime", "UID"):
            parts.append(str(item.get(keyword, "")))
        for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            parts += [f"{c.get('CodeValue', '')} {c.get('CodeMeaning', '')}" for c in item.get(seq, [])]
        parts.append(sr_free_text(item))
    return "\n".join(parts)


# --- the node ---------------------------------------------------------------------------------


def node_config(tmp: Path, package: Path) -> Path:
    cfg = tmp / "node.toml"
    cfg.write_text(textwrap.dedent(f"""
        [scp]
        ae_title = "CXR-AI"
        port = {free_port()}
        [storage]
        data_dir = "var"
        [worker]
        poll_s = 0.1
        retry_initial_s = 0.2
        max_attempts = 2
        [send]
        retry_initial_s = 0.2
        retry_max_s = 0.5
        [[destinations]]
        name = "pacs"
        ae_title = "PACS"
        host = "127.0.0.1"
        port = {free_port()}
        [model]
        package = "{package}"
        [thresholds]
        Tuberculosis = 0.0
    """))
    return cfg


def send_all(port: int, cases: list[Case]) -> None:
    """A pynetdicom SCU sends every case on one association (a new one if the node aborts it)."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CR_IMAGE, [ExplicitVRLittleEndian])
    for case in cases:
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR-AI")
        assert assoc.is_established, f"association for case {case.name}"
        try:
            assoc.send_c_store(case.ds)
        finally:
            if assoc.is_established:
                assoc.release()


def run_cli(cfg: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=REPO, check=False)
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def node_outputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Case], dict[str, str]]]:
    """Run a node, send every hostile case, let the queue settle, and collect every output it wrote."""
    pytest.importorskip("torch", reason="building a test model package needs the train extra")
    from tests.model_fixtures import build_tiny_package
    from tests.test_e2e import NodeProcess

    tmp = tmp_path_factory.mktemp("privacy")
    package = build_tiny_package(tmp / "pkg", size=64)
    cfg = node_config(tmp, package)
    cases = hostile_cases()
    node = NodeProcess(cfg)
    try:
        from node.config import load_settings

        send_all(load_settings(cfg, environ={}).scp.port, cases)
        wait_for(lambda: settled(cfg), timeout=60, what="every job to end done, skipped or failed")
        time.sleep(1.5)  # a few send retries to the absent PACS, so outbox.last_error is written
    finally:
        node.stop()
    outputs = {"node stdout/stderr": node.log_text(),
               "status --format json": run_cli(cfg, "status", "--format", "json"),
               "status": run_cli(cfg, "status")}
    databases = sorted((tmp / "var").glob("*.sqlite"))
    assert databases, "the node's SQLite database should be in var/"
    for db in databases:
        outputs.update(database_texts(db))  # the audit trail, the console's tables and the queue included
    outputs["metrics"] = metrics_text(tmp / "var" / "metrics")
    for path in sorted((tmp / "var").rglob("results/**/*.dcm")):
        outputs[f"result {path.name}"] = sr_free_text(pydicom.dcmread(path))
    yield cases, outputs


def settled(cfg: Path) -> bool:
    """Every received image has a job and none is queued or running."""
    out = subprocess.run([sys.executable, "-m", "node.cli", "--log-level", "ERROR", "status", "--config", str(cfg),
                          "--format", "json"], capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    try:
        status = json.loads(out.stdout)
    except json.JSONDecodeError:
        return False
    jobs: dict[str, int] = status.get("jobs", {})
    return sum(jobs.values()) > 0 and not jobs.get("queued") and not jobs.get("running")


@pytest.mark.integration
@pytest.mark.parametrize("case_name", list(CASES))
def test_no_planted_value_reaches_any_output(node_outputs: tuple[list[Case], dict[str, str]],
                                             case_name: str) -> None:
    cases, outputs = node_outputs
    case = next(c for c in cases if c.name == case_name)
    assert not leaks(case, outputs), "patient values written by the node: " + "; ".join(leaks(case, outputs))
    assert any(k.startswith("result ") for k in outputs), "the frontal cases should produce results"


# --- the guard, in a process of its own -------------------------------------------------------

GUARDED_SCRIPT = r"""
import logging, threading, warnings
from node.logs import setup_logging
setup_logging("DEBUG")
import pydicom
from pydicom import config
from pydicom.dataset import Dataset
config.settings.reading_validation_mode = config.WARN
config.settings.writing_validation_mode = config.WARN
config.debug(True)  # pydicom reconfigures its logger and adds its own handler after setup_logging
ds = Dataset()
ds.StudyInstanceUID = "1.2.ZQXGUARDUI"
ds.PatientSex = "ZQXGUARDCS"
ds.ContentDate = "7319528"
log = logging.getLogger("node.test")
try:
    ds.SeriesNumber = "ZQXGUARDIS"
except ValueError as exc:
    log.warning("setting SeriesNumber failed: %s", exc)
    log.exception("with traceback")
    log.error(exc)
read = pydicom.dcmread(RAW_PATH, force=True)
str(read.Modality)
logging.captureWarnings(True)
warnings.warn("ZQXGUARDWARN")
thread = threading.Thread(target=lambda: int("ZQXGUARDTHREAD"))
thread.start()
thread.join()
raise ValueError("ZQXGUARDMAIN")
"""


def test_guard_scrubs_pydicom_warnings_logs_and_exceptions_in_a_process(tmp_path: Path) -> None:
    """pydicom's logger (even reconfigured by ``config.debug``), ``warnings``, log arguments and
    tracebacks, thread and main-thread crashes: no marker reaches stderr, the kind of problem does."""
    wrong = wrong_length_case(base_dataset("G"))
    assert wrong.raw is not None
    raw_path = tmp_path / "wrong_length.dcm"
    raw_path.write_bytes(wrong.raw)
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED_SCRIPT.replace("RAW_PATH", repr(str(raw_path))))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's node package, whatever is installed
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env=env, check=False)
    text = out.stdout + out.stderr
    code_lines = {line for line in text.splitlines() if line.startswith("    ")}  # traceback source lines
    said = "\n".join(line for line in text.splitlines() if line not in code_lines)
    for planted in ("ZQXGUARD", *wrong.letters):
        assert planted not in said, f"{planted} reached stderr:\n{said}"
    for planted in ("7319528", *wrong.numbers):
        assert not appears_as_value(planted, said), f"{planted} reached stderr:\n{said}"
    assert "Invalid value for VR UI (value withheld)" in said, said
    assert "uncaught exception in thread" in said and "uncaught exception" in said, said
    assert out.returncode == 1


# --- describe() and the filter's reasons ------------------------------------------------------


def test_describe_withholds_library_messages() -> None:
    try:
        pydicom.valuerep.IS("12ZQXDESCRIBE")
    except ValueError as exc:
        text = describe(exc)
    assert text.startswith("ValueError: ") and "ZQXDESCRIBE" not in text and "valuerep.py" in text, text
    assert describe(FileNotFoundError(2, "No such file or directory", "/var/x.dcm")) == (
        "FileNotFoundError: [ENOENT] No such file or directory: /var/x.dcm")
    from ai.errors import UnsupportedImage

    assert describe(UnsupportedImage("no PixelData in 1.2.3")) == "UnsupportedImage: no PixelData in 1.2.3"
    assert safe_text("Invalid value for VR DA: '19ZQX'.") == "Invalid value for VR DA (value withheld)"
    assert safe_text("bad (0010,0010) ZQX at VR PN") == \
        "text withheld, it may quote element values (VR PN; (0010,0010) PatientName)"


FILTER_ATTRIBUTES = ("Modality", "BodyPartExamined", "ViewPosition", "StudyDescription", "SeriesDescription",
                     "ProtocolName", "AcquisitionDeviceProcessingDescription", "PatientSpeciesDescription")


@pytest.mark.parametrize("prefix", ["", "CHEST ", "LL ", "PA ", "CANINE ", "SPINE ", "CR "])
@pytest.mark.parametrize("keyword", FILTER_ATTRIBUTES)
def test_filter_reasons_never_echo_a_value(keyword: str, prefix: str) -> None:
    """Whatever a filter attribute holds beside a rule word, the reason quotes only the rule's words."""
    rules = FilterRules.load(None)
    case = base_dataset("Z")
    plant(case, keyword, f"{prefix}ZQXFILTER")
    ds = case.ds
    for settings in (FilterSettings(), FilterSettings(no_view_policy="skip")):
        reason = decide(ds, settings, rules).reason
        assert "ZQX" not in reason, reason


def test_a_reason_built_from_a_library_error_never_keeps_its_value() -> None:
    """A value with a quote in it defeats a blocklist; the library's message goes through the allowlist."""
    from node.privacy import message_of
    from node.results import scrub_reason

    exc = ValueError("Unable to convert 'O'BRIEN^JOHN' to 'DA' object")
    reason = scrub_reason(message_of(exc))
    assert "BRIEN" not in reason and "JOHN" not in reason
    assert "BRIEN" in scrub_reason(str(exc))  # what the blocklist alone lets through
