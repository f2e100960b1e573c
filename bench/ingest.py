"""Ingest benchmark: C-STORE throughput of ``cxr-node serve --role scp`` against dcmtk ``storescp``.

Both servers receive the same corpus from the same dcmtk client (``dcmsend``, each file in its own
transfer syntax, ``TCP_NODELAY=1``) over one association and over N parallel associations (N client
processes, each sending its share). The wall time from starting the clients to the last client's exit
gives images/s and MB/s; every measurement uses a fresh server with an empty folder (and, for the node,
an empty SQLite database), and is checked: every image answered Success, every image arrived (storescp:
a file per image; node: an instance row + job row per image and its file on disk).

Runs are interleaved (storescp, node, node, storescp, ...) so that the load of other work on the machine
falls on both servers alike; the load average is recorded before and after every measurement.

Not alike, and said so in the results: the node fsyncs every file and its folder and commits its job
row (SQLite WAL, synchronous=FULL) before it answers Success; storescp writes without fsync.

Memory state (``--memory-state``). On a VM whose balloon device reports free pages to the hypervisor
(virtio-balloon free page reporting: Linux hands memory that has stayed free back to the host, in
passes every 2 s), the first write into each such page faults on the host: on the development VM that
costs ~13 ms of kernel CPU per 8.4 MB image, whichever server writes it. Sending right after another
server's folder was deleted can instead reuse still-backed pages and run up to 2.5x faster. Without care
the comparison then depends on which server ran before (bench/README.md). ``settled`` (the default)
waits ``SETTLE_S`` after the server is ready, so that every server writes into the same kind of memory,
as on a VM with plenty of free memory. ``warm`` writes and deletes a file of 1.5x the corpus right before
sending (racy: a reporting pass may come at any time). ``as-is`` does neither (the behaviour before).

Run on demand (not part of the test suite)::

    .venv/bin/python bench/ingest.py                       # 100 synthetic 2048x2048 CR, 3 runs, 1 and 4 assoc.
    .venv/bin/python bench/ingest.py --images 40 --runs 1  # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import system_tool  # noqa: E402 - dcmtk's programs, not pynetdicom's same-named apps


def dcmtk(name: str) -> str:
    """dcmtk's program ``name`` (pynetdicom's console scripts of the same name are skipped)."""
    path = system_tool(name)
    if path is None:
        sys.exit(f"{name} not found: install Debian's dcmtk")
    return path
RESULTS = REPO / "bench" / "results" / "ingest.json"
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
CORPUS_VERSION = 1  # bump when the synthetic images change
NODE_AE = "CXR-AI"
STORESCP_AE = "STORESCP"
CALLING_AE = "BENCH-MOD"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle on otherwise (~40 ms per C-STORE)
NODE_STOP_TIMEOUT_S = 30.0
SETTLE_S = 8.0  # several 2 s reporting passes; enough here with ~16 GB free (checked: storescp slow in 5 of 5)
GOAL = 0.7  # node images/s >= 0.7 x storescp's, at every association count
DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*(0x[0-9a-fA-F]{4})")  # in dcmsend's report file


# --- the corpus -------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cxr-node-bench"


def chest_like(size: int) -> np.ndarray:
    """A smooth chest-like 12-bit picture: body outline, two darker lungs, a bright mediastinum."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    body = np.exp(-((x / 0.85) ** 8) - ((y / 0.98) ** 8))
    lungs = sum(np.exp(-(((x - cx) / 0.28) ** 4) - (((y + 0.05) / 0.55) ** 4)) for cx in (-0.38, 0.38))
    mediastinum = np.exp(-((x / 0.12) ** 4)) * (y > -0.6)
    return (250.0 + 2600.0 * body - 1500.0 * lungs + 700.0 * mediastinum).astype(np.float32)


def synthetic_cr(base: np.ndarray, index: int, study_uid: str, rng: np.random.Generator) -> Dataset:
    """A 16-bit MONOCHROME2 CR PA chest image, uncompressed Explicit VR Little Endian, unique UIDs."""
    noisy = base + rng.standard_normal(base.shape, dtype=np.float32) * 40.0
    pixels = np.clip(noisy * rng.uniform(0.9, 1.1), 0, 4095).astype("<u2")
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientName, ds.PatientID = f"BENCH^SYNTHETIC^{index // 2:04d}", f"BENCH{index // 2:06d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.StudyID = f"ACC{index // 2:06d}", "1"
    ds.SeriesNumber, ds.InstanceNumber = 1, index % 2 + 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.SeriesDescription = "CHEST PA (synthetic benchmark image)"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def build_corpus(cache_dir: Path, images: int, size: int) -> list[Path]:
    """The synthetic corpus, generated once (two images per study) and reused while its recipe holds."""
    folder = cache_dir / f"ingest-v{CORPUS_VERSION}-{images}x{size}"
    recipe = {"version": CORPUS_VERSION, "images": images, "size": size}
    marker = folder / "corpus.json"
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return sorted(folder.glob("img*.dcm"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log(f"building the corpus: {images} synthetic {size}x{size} 16-bit CR images in {folder}")
    base, rng = chest_like(size), np.random.default_rng(20250101)
    study_uid = ""
    for i in range(images):
        study_uid = generate_uid() if i % 2 == 0 else study_uid
        synthetic_cr(base, i, study_uid, rng).save_as(folder / f"img{i:05d}.dcm", enforce_file_format=True)
    marker.write_text(json.dumps(recipe))
    return sorted(folder.glob("img*.dcm"))


def real_files(data_dir: Path) -> list[Path]:
    """The real files of ``../shared/data/dicom``, one per SOP Instance UID (a variant shares its UID)."""
    seen: dict[str, Path] = {}
    for path in sorted((data_dir / "dicom").glob("*.dcm")):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        seen.setdefault(uid, path)
    return list(seen.values())


# --- servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int, running_children: bool = False) -> float:
    """User + system CPU of a process and of its children that were waited for (/proc/PID/stat).

    ``running_children``: also the CPU of its running children (the SCP children of ``node-Nproc``).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split() if running_children else []
    except OSError:
        return float("nan")
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK") + sum(cpu_seconds(int(c)) for c in children)


def node_processes(kind: str) -> int:
    """SCP processes of a node server kind: ``node-2proc`` -> 2, any other node -> 1."""
    found = re.fullmatch(r"node-(\d+)proc", kind)
    return int(found.group(1)) if found else 1


def wait_all_listening(log_path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """Wait until a node with several SCP processes logs that all of them listen."""
    deadline = time.monotonic() + timeout_s
    while "SCP processes listening on port" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the node's SCP processes did not all listen (exit status {proc.poll()})")
        time.sleep(0.1)


def wait_ready(port: int, called_ae: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until the server answers C-ECHO (a bare TCP connect would hold a single-process storescp)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it answered C-ECHO")
        done = subprocess.run([dcmtk("echoscu"), "-to", "2", "-aet", CALLING_AE, "-aec", called_ae, "127.0.0.1",
                               str(port)], env=DCMTK_ENV, capture_output=True, check=False)
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not answer C-ECHO within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=NODE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Server:
    """One server under test, started fresh in ``folder`` for each measurement."""

    kind: str  # "storescp", "storescp-fork", "node", "node-<N>proc" or "node-nofsync" (diagnostic)
    called_ae: str
    port: int = 0
    folder: Path = Path()
    proc: subprocess.Popen[bytes] | None = None

    def count_arrived(self, expected_uids: set[str]) -> int:
        """How many of the expected instances arrived (files; for the node rows + files)."""
        if self.kind.startswith("node"):
            db = self.folder / "data" / "cxr-node.sqlite"
            with contextlib.closing(sqlite3.connect(db)) as con:
                rows = con.execute("SELECT i.sop_instance_uid, i.path FROM instances i "
                                   "JOIN jobs j ON j.instance_id = i.id").fetchall()
            return sum(1 for uid, path in rows if uid in expected_uids and Path(path).is_file())
        found = set()
        for path in (self.folder / "out").rglob("*"):
            if path.is_file():
                found.add(str(pydicom.dcmread(path, stop_before_pixels=True,
                                              specific_tags=["SOPInstanceUID"]).SOPInstanceUID))
        return len(found & expected_uids)


@contextlib.contextmanager
def running(kind: str, args: argparse.Namespace) -> Iterator[Server]:
    """Start a server in an empty folder under ``work_dir``; stop it and remove the folder afterwards.

    ``node-nofsync`` gets its folder under ``--no-fsync-dir`` instead (tmpfs, see :func:`no_fsync_dir`).
    """
    parent = no_fsync_dir(args.no_fsync_dir) if kind == "node-nofsync" else args.work_dir
    folder = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=parent))
    port = free_port()
    if kind.startswith("node"):
        server = Server(kind, NODE_AE, port, folder)
        cmd = node_command(folder, port, args.node_max_pdu or args.max_pdu, args.node_log_level,
                           node_processes(kind))
    else:
        server = Server(kind, STORESCP_AE, port, folder)
        (folder / "out").mkdir()
        # A real archive's layout: one folder per study, files named by SOP Instance UID.
        cmd = [dcmtk("storescp"), "--fork" if kind == "storescp-fork" else "--single-process", "-aet", STORESCP_AE,
               "-od", str(folder / "out"), "-su", "study", "-uf", "-pdu", str(args.max_pdu), "+xa", str(port)]
    with open(folder / "server.log", "wb") as server_log:
        server.proc = subprocess.Popen(cmd, env=DCMTK_ENV, stdout=server_log, stderr=subprocess.STDOUT,
                                       cwd=folder)
        try:
            try:
                wait_ready(port, server.called_ae, server.proc)
                if node_processes(kind) > 1:
                    wait_all_listening(folder / "server.log", server.proc)
            except RuntimeError:
                log((folder / "server.log").read_text(errors="replace")[-3000:])
                raise
            yield server
        finally:
            stop(server.proc)
            shutil.rmtree(folder, ignore_errors=True)


def node_command(folder: Path, port: int, max_pdu: int, log_level: str, processes: int = 1) -> list[str]:
    """``cxr-node serve --role scp`` on a fresh config (SQLite in the folder): the node as deployed, built by
    its own composition root (``node.app.Node``, which does not import the model runtime for this role)."""
    config = folder / "node.toml"
    config.write_text(
        f'[scp]\nae_title = "{NODE_AE}"\nport = {port}\nbind_address = "127.0.0.1"\n'
        f"max_pdu = {max_pdu}\nmax_associations = 16\nprocesses = {processes}\n\n"
        f'[storage]\ndata_dir = "{folder / "data"}"\n'
    )
    exe = Path(sys.executable).with_name("cxr-node")
    return [str(exe), "--log-level", log_level, "serve", "--config", str(config), "--role", "scp"]


def no_fsync_dir(folder: Path) -> Path:
    """Where ``node-nofsync`` keeps its data folder: a tmpfs, on which fsync returns at once.

    The diagnostic (``--diagnose-no-fsync``; bench/README.md, "node-nofsync") shows what durability costs
    on this disk: the node runs exactly as deployed, with its files and SQLite database where flushing
    costs nothing, instead of having its fsync calls patched out.
    """
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    resolved = folder.resolve()
    mount = max((m for m in mounts if resolved.is_relative_to(m[1])), key=lambda m: len(m[1]), default=None)
    if mount is None or mount[2] != "tmpfs":
        sys.exit(f"--no-fsync-dir {folder}: expected a folder on tmpfs, found {mount[2] if mount else 'no mount'}")
    return resolved


# --- clients and one measurement ----------------------------------------------------------------


@dataclass
class Measurement:
    """One timed transfer of the whole corpus to one server."""

    server: str
    associations: int
    run: int
    images: int
    megabytes: float
    seconds: float
    images_per_s: float
    mb_per_s: float
    successes: int
    arrived: int
    server_cpu_s: float
    client_cpu_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    ok: bool = field(default=False)


def send(server: Server, shares: list[list[Path]], report_dir: Path) -> tuple[float, int, float]:
    """Start one dcmsend per share at once: the wall time until the last exits, Successes, client CPU s."""
    procs = []
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    for i, files in enumerate(shares):
        report = report_dir / f"dcmsend-{i}.txt"
        cmd = [dcmtk("dcmsend"), "-aet", CALLING_AE, "-aec", server.called_ae, "--decompress-never", "--no-halt",
               "--create-report-file", str(report), "127.0.0.1", str(server.port), *map(str, files)]
        procs.append(subprocess.Popen(cmd, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - t0
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the clients are the only children reaped here
    client_cpu = children1.ru_utime + children1.ru_stime - children0.ru_utime - children0.ru_stime
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            log(f"  dcmsend exited with {p.returncode}: {err.decode(errors='replace')[-500:]}")
    statuses = []
    for i in range(len(shares)):
        with contextlib.suppress(FileNotFoundError):
            statuses += DIMSE_STATUS.findall((report_dir / f"dcmsend-{i}.txt").read_text())
    return seconds, statuses.count("0x0000"), client_cpu


def measure(kind: str, associations: int, run: int, corpus: list[Path], uids: set[str],
            args: argparse.Namespace) -> Measurement:
    shares = [corpus[i::associations] for i in range(associations)]
    megabytes = sum(p.stat().st_size for p in corpus) / 1e6
    # Start every measurement with no dirty pages left by the previous server: storescp never flushes,
    # so without this the kernel's writeback of its files throttles whichever server runs next.
    os.sync()
    with running(kind, args) as server:
        assert server.proc is not None
        settle_memory(args.memory_state, args.work_dir, int(megabytes * 1e6))
        load_before = os.getloadavg()
        with_children = node_processes(kind) > 1
        cpu0 = cpu_seconds(server.proc.pid, with_children)
        seconds, successes, client_cpu = send(server, shares, server.folder)
        cpu = cpu_seconds(server.proc.pid, with_children) - cpu0  # storescp --fork: children are counted once reaped
        load_after = os.getloadavg()
        arrived = server.count_arrived(uids)
    m = Measurement(kind, associations, run, len(corpus), round(megabytes, 1), round(seconds, 3),
                    round(len(corpus) / seconds, 2), round(megabytes / seconds, 1), successes, arrived,
                    round(cpu, 2), round(client_cpu, 2), _round3(load_before), _round3(load_after))
    m.ok = successes == len(corpus) and arrived == len(uids)
    log(f"  run {run} {kind:<13} x{associations}: {m.images_per_s:7.2f} img/s {m.mb_per_s:7.1f} MB/s "
        f"({seconds:.2f} s, CPU server {cpu:.1f} s clients {client_cpu:.1f} s, load {load_before[0]:.2f}) "
        f"{'ok' if m.ok else f'INCOMPLETE: {successes} successes, {arrived} arrived of {len(corpus)}'}")
    return m


def settle_memory(state: str, work_dir: Path, nbytes: int) -> None:
    """Bring the guest's free memory to ``state`` right before sending (see the module docstring)."""
    if state == "settled":
        time.sleep(SETTLE_S)
    elif state == "warm":
        path = work_dir / "warm-up.bin"
        block = b"\xa5" * (1 << 20)
        with open(path, "wb") as f:
            for _ in range(-(-nbytes * 3 // 2 // len(block))):
                f.write(block)
        path.unlink()  # freed without writeback: the next writer reuses these pages while they are backed


def free_page_reporting() -> bool | None:
    """Whether a virtio balloon with free page reporting (feature bit 5) is present; None if unknown."""
    try:
        devices = list(Path("/sys/bus/virtio/devices").iterdir())
    except OSError:
        return None
    for device in devices:
        with contextlib.suppress(OSError):
            if (device / "device").read_text().strip() == "0x0005":  # VIRTIO_ID_BALLOON
                features = (device / "features").read_text().strip()
                return len(features) > 5 and features[5] == "1"  # VIRTIO_BALLOON_F_REPORTING
    return False


def _round3(load: Sequence[float]) -> tuple[float, float, float]:
    return (round(load[0], 2), round(load[1], 2), round(load[2], 2))


# --- the run and its report ------------------------------------------------------------------


def servers_for(associations: int, args: argparse.Namespace) -> list[str]:
    """storescp serves parallel associations in parallel only with --fork (one process each)."""
    if associations == 1 or args.storescp_mode == "single":
        kinds = ["storescp", "node"]
    elif args.storescp_mode == "fork":
        kinds = ["storescp-fork", "node"]
    else:
        kinds = ["storescp-fork", "storescp", "node"]
    kinds += [f"node-{args.node_processes}proc"] if args.node_processes > 1 else []
    kinds += ["node-nofsync"] if args.diagnose_no_fsync else []
    return [k for k in kinds if k.split("-")[0] in args.servers]


def baseline(medians: dict[str, dict[str, Any]]) -> str | None:
    """The faster storescp (by median images/s): the ratio is taken against the stronger dcmtk figure."""
    kinds = [k for k in medians if k.startswith("storescp")]
    return max(kinds, key=lambda k: medians[k]["images_per_s"]) if kinds else None


def run_all(corpus: list[Path], uids: set[str], args: argparse.Namespace) -> list[Measurement]:
    """Every (run, associations, server), interleaved; the server order alternates between runs."""
    results = []
    for run in range(1, args.runs + 1):
        for associations in args.associations:
            kinds = servers_for(associations, args)
            for kind in kinds if run % 2 else list(reversed(kinds)):
                results.append(measure(kind, associations, run, corpus, uids, args))
    return results


def summarize(results: list[Measurement], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for associations in args.associations:
        medians = {}
        for kind in servers_for(associations, args):
            ms = [m for m in results if m.server == kind and m.associations == associations]
            medians[kind] = {
                "images_per_s": statistics.median(m.images_per_s for m in ms),
                "mb_per_s": statistics.median(m.mb_per_s for m in ms),
                "server_cpu_s": statistics.median(m.server_cpu_s for m in ms),
                "all_ok": all(m.ok for m in ms),
                "runs": len(ms),
            }
        base = baseline(medians)
        row: dict[str, Any] = {"associations": associations, "baseline": base, "median": medians}
        if "node" in medians and base is not None:
            ratio = medians["node"]["images_per_s"] / medians[base]["images_per_s"]
            row |= {"ratio_node_to_baseline": round(ratio, 3), "goal": GOAL, "meets_goal": ratio >= GOAL}
        if "node-nofsync" in medians and base is not None:
            ratio = medians["node-nofsync"]["images_per_s"] / medians[base]["images_per_s"]
            row["ratio_node_nofsync_to_baseline"] = round(ratio, 3)
        nproc = f"node-{args.node_processes}proc"
        if nproc in medians and base is not None:
            ratio = medians[nproc]["images_per_s"] / medians[base]["images_per_s"]
            row |= {"node_processes": args.node_processes, "ratio_node_nproc_to_baseline": round(ratio, 3),
                    "nproc_meets_goal": ratio >= GOAL}
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'assoc':>5}  {'server':<14}{'img/s':>8}{'MB/s':>8}{'CPU s':>8}  ok",
             "-" * 50]
    for row in rows:
        for kind, med in row["median"].items():
            lines.append(f"{row['associations']:>5}  {kind:<14}{med['images_per_s']:>8.2f}{med['mb_per_s']:>8.1f}"
                         f"{med['server_cpu_s']:>8.1f}  {'yes' if med['all_ok'] else 'NO'}")
        if "meets_goal" in row:
            verdict = "meets" if row["meets_goal"] else "BELOW"
            lines.append(f"{'':>5}  node / {row['baseline']}: {row['ratio_node_to_baseline']:.2f} "
                         f"({verdict} goal {GOAL})")
        if "ratio_node_nproc_to_baseline" in row:
            verdict = "meets" if row["nproc_meets_goal"] else "BELOW"
            lines.append(f"{'':>5}  node-{row['node_processes']}proc / {row['baseline']}: "
                         f"{row['ratio_node_nproc_to_baseline']:.2f} ({verdict} goal {GOAL}; scp.processes)")
        if "ratio_node_nofsync_to_baseline" in row:
            lines.append(f"{'':>5}  node-nofsync / {row['baseline']}: {row['ratio_node_nofsync_to_baseline']:.2f} "
                         "(diagnostic: data on tmpfs, where fsync returns at once)")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])  # type: ignore[index]
    dcmtk_version = subprocess.run([dcmtk("storescp"), "--version"], capture_output=True,
                                   text=True).stdout.splitlines()[0]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "node/receive.py", "node/intake.py",
                            "node/refusals.py", "node/incoming.py", "node/transport.py", "node/scp_server.py",
                            "storage/files.py"], capture_output=True, text=True).stdout.strip()
    import pynetdicom
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 1e6, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "pynetdicom": pynetdicom.__version__, "pydicom": pydicom.__version__, "dcmtk": dcmtk_version,
            "commit": commit + (" (receive/storage modified)" if dirty else ""),
            "free_page_reporting": free_page_reporting(),
            "load_at_start": _round3(os.getloadavg())}


def fsync_latency_ms(folder: Path, size: int, samples: int = 10) -> dict[str, float]:
    """Median ms of the flushes one durable image costs in ``folder``: fsync of a ``size``-byte file, of its folder."""
    file_s, dir_s = [], []
    data = os.urandom(size)
    for i in range(samples):
        path = folder / f"fsync-probe-{i}"
        with open(path, "wb") as f:
            f.write(data)
            t0 = time.perf_counter()
            os.fsync(f.fileno())
            file_s.append(time.perf_counter() - t0)
        fd = os.open(folder, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            os.fsync(fd)
            dir_s.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
        path.unlink()
    return {"file": round(1e3 * statistics.median(file_s), 2), "folder": round(1e3 * statistics.median(dir_s), 2)}


NOTES = [
    "Wall time = start of the dcmsend client processes until the last exits (includes dcmsend's scan of its "
    "input files and association set-up); images/s = images / wall time; medians over runs.",
    "The node answers Success only after the file is fsync'd, renamed atomically, its folder fsync'd and its "
    "instance + job rows committed (SQLite WAL, synchronous=FULL). storescp does NOT fsync: its files may "
    "still be in the page cache when it answers Success.",
    "storescp-fork serves each association in its own process (parallel on all cores); storescp in its "
    "default single-process mode serves associations one after another.",
    "Clients and servers share the machine's cores, and other work may run beside the benchmark: see the "
    "load averages; runs are interleaved so that load falls on both servers alike.",
    "params.memory_state: settled = every server waited SETTLE_S after it was ready, so that memory freed by the "
    "previous measurement had been reported to the hypervisor (virtio-balloon free page reporting, "
    "machine.free_page_reporting) and every server wrote into the same kind of pages; warm = a file of 1.5x "
    "the corpus written and deleted right before sending (racy: the reporting pass may come at any time); "
    "as-is = neither.",
]


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes a table to stdout and the raw runs to --out (JSON).")
    p.add_argument("--images", type=int, default=100, help="synthetic images in the corpus (default 100)")
    p.add_argument("--size", type=int, default=2048, help="rows = columns of each image (default 2048)")
    p.add_argument("--runs", type=int, default=3, help="repeats of each measurement; the median is reported")
    p.add_argument("--associations", type=int, nargs="+", default=[1, 4],
                   help="parallel associations (one dcmsend process each) to measure (default 1 4)")
    p.add_argument("--storescp-mode", choices=("fork", "single", "both"), default="both",
                   help="storescp for parallel associations: --fork (a process per association), single-process "
                        "(associations one after another), or both (default; the ratio is taken against the faster)")
    p.add_argument("--servers", nargs="+", choices=("storescp", "node"), default=["storescp", "node"],
                   help="which servers to measure (default both; one alone gives no ratio)")
    p.add_argument("--diagnose-no-fsync", action="store_true",
                   help="also measure node-nofsync: the node as deployed with its data folder on tmpfs "
                        "(--no-fsync-dir), where fsync returns at once, to show what durability costs on this disk "
                        "(a diagnostic, never a configuration; not in the ratio; bench/README.md)")
    p.add_argument("--node-processes", type=int, default=0,
                   help="also measure node-<N>proc: the node with scp.processes = N (N > 1; CPU s include its "
                        "SCP children)")
    p.add_argument("--memory-state", choices=("settled", "warm", "as-is"), default="settled",
                   help="the guest memory every server starts from: settled (wait for free page reporting; default), "
                        "warm (freshly freed pages), as-is (no preparation); see the module docstring")
    p.add_argument("--include-real", action="store_true",
                   help="also send the real files of ../shared/data/dicom (compressed, as they are)")
    p.add_argument("--max-pdu", type=int, default=131072,
                   help="maximum receive PDU of both servers (default 131072, the node's default)")
    p.add_argument("--node-max-pdu", type=int, default=0,
                   help="the node's scp.max_pdu when it should differ from --max-pdu (storescp takes at most 131072)")
    p.add_argument("--node-log-level", default="INFO", help="the node's --log-level (default INFO, as deployed)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where the corpus is generated once (default $XDG_CACHE_HOME/cxr-node-bench)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the servers write (default: a temporary folder, removed afterwards)")
    p.add_argument("--no-fsync-dir", type=Path, default=Path("/dev/shm"),
                   help="a folder on tmpfs for node-nofsync's data (default /dev/shm; see --diagnose-no-fsync)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS.relative_to(REPO)})")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.diagnose_no_fsync:
        no_fsync_dir(args.no_fsync_dir)  # before any measurement: exits when it is not on tmpfs
    for tool in ("storescp", "dcmsend", "echoscu"):
        if system_tool(tool) is None:
            sys.exit(f"{tool} not found: install the Debian package dcmtk")
    corpus = build_corpus(args.cache_dir, args.images, args.size)
    if args.include_real:
        corpus += real_files(REPO.parent / "shared" / "data")
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            for p in corpus}
    for path in corpus:  # warm the page cache so that the first run reads no more from disk than the others
        path.read_bytes()
    info = machine_info()
    log(f"corpus: {len(corpus)} files, {sum(p.stat().st_size for p in corpus) / 1e6:.0f} MB; "
        f"{info['cores']} cores ({info['cpu']}); load average at start {info['load_at_start']}")
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            args.work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cxr-bench-ingest-")))
        args.work_dir.mkdir(parents=True, exist_ok=True)
        info["fsync_ms"] = fsync_latency_ms(args.work_dir, max(p.stat().st_size for p in corpus))
        log(f"fsync in the servers' folder (median): {info['fsync_ms']['file']} ms for one image file, "
            f"{info['fsync_ms']['folder']} ms for its folder")
        results = run_all(corpus, uids, args)
    rows = summarize(results, args)
    loads = [m.load_before[0] for m in results] + [m.load_after[0] for m in results]
    info["load_during"] = {"min": min(loads), "median": round(statistics.median(loads), 2), "max": max(loads)}
    log("\n" + table(rows))
    log(f"\n1-min load average during the measurements: {info['load_during']} on {info['cores']} cores")
    log("storescp does not fsync; the node fsyncs the file + folder and commits its job row before Success.")
    log(f"memory state before each send: {args.memory_state} (free page reporting: {info['free_page_reporting']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in vars(args).items() if k not in ("cache_dir", "work_dir", "out", "no_fsync_dir")}
    params["no_fsync_dir"] = str(args.no_fsync_dir) if args.diagnose_no_fsync else None
    params["settle_s"] = SETTLE_S if args.memory_state == "settled" else 0.0
    args.out.write_text(json.dumps({"benchmark": "ingest", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "command": " ".join(["python", "bench/ingest.py", *sys.argv[1:]]),
                                    "params": params, "machine": info, "summary": rows, "notes": NOTES,
                                    "runs": [asdict(m) for m in results]}, indent=2) + "\n")
    log(f"results written to {args.out}")
    return 0 if all(m.ok for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
