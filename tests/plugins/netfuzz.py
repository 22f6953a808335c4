"""A seeded network fuzzer for the DICOM listener: mutated datasets, commands, PDUs and associations.

Each case opens a real TCP connection to a running listener and sends something derived from
real radiographs (never noise alone): a dataset cut, bit-flipped, with a lying length or
spliced; the same deflated, or a deflate bomb; a C-STORE command set with elements deleted or
replaced; random or lying PDUs after association; a mutated A-ASSOCIATE-RQ.  The oracle for
"success for bad data" is the completeness check the conformance statement promises: a dataset
whose element structure does not account for exactly the bytes sent, or whose deflate stream
does not end cleanly, must never get 0x0000.

``check_invariants`` is what every batch must keep: C-ECHO answers, a good store succeeds,
database rows equal spool files (count and SHA-256), and the listener's RSS stays bounded.
The same engine runs a few hundred cases in the test suite and tens of thousands in
``make fuzz``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import random
import socket
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from sqlalchemy import select

from db.models import Instance
from db.session import make_engine
from dicom_io.reconcile import QUARANTINE_DIRNAME
from dicom_io.spool import STAGING_DIRNAME
from dicom_io.structure import IncompleteDatasetError, check_complete
from tests.conftest import pydicom_data_file, shared_file
from tests.plugins import rawdicom
from tests.plugins.ingest import dataset_bytes, echoscu, storescu, transfer_syntax_of

MIB = 1024 * 1024
SEED_FILES = (
    ("dicom", "dx_for_presentation_animal_lateral.dcm"),
    ("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm"),
    ("dicom", "nema_cr_mono1_10bit_chest_no_meta.dcm"),
    (None, "RG3_J2KI.dcm"),
)


@dataclass(frozen=True)
class Seed:
    """One real radiograph as the wire carries it."""

    name: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    data: bytes  # the dataset bytes in `transfer_syntax`


def load_seeds() -> list[Seed]:
    seeds = []
    for folder, name in SEED_FILES:
        path = shared_file(folder, name) if folder else pydicom_data_file(name)
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        raw = path.read_bytes()
        seeds.append(
            Seed(name, str(ds.SOPClassUID), str(ds.SOPInstanceUID), transfer_syntax_of(path), dataset_bytes(raw))
        )
    return seeds


def _deflate(data: bytes, level: int = 6) -> bytes:
    z = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = z.compress(data) + z.flush()
    return out + b"\x00" if len(out) % 2 else out


def complete(data: bytes, transfer_syntax: str) -> bool:
    """The oracle: is this a whole, well-formed dataset with Pixel Data, as the conformance statement defines it?"""
    try:
        if transfer_syntax == rawdicom.DEFLATED:
            z = zlib.decompressobj(-zlib.MAX_WBITS)
            data = z.decompress(data, 512 * MIB)
            if not z.eof or z.unconsumed_tail or z.unused_data.strip(b"\x00") or len(z.unused_data) > 1:
                return False
        implicit = transfer_syntax == rawdicom.IMPLICIT_LE
        big = transfer_syntax == "1.2.840.10008.1.2.2"
        return check_complete(
            io.BytesIO(data), 0, len(data), implicit_vr=implicit, little_endian=not big
        ).has_pixel_data
    except (zlib.error, IncompleteDatasetError):
        return False


# --------------------------------------------------------------------------- mutators


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _lie_length(rng: random.Random, data: bytes) -> bytes:
    """Overwrite 4 bytes near an element header with a lying length."""
    if len(data) < 16:
        return data
    pos = rng.randrange(0, len(data) - 4) & ~1
    value = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 0, len(data), len(data) - pos + 2, rng.getrandbits(32)])
    return data[:pos] + struct.pack("<L", value) + data[pos + 4 :]


def _splice(rng: random.Random, data: bytes) -> bytes:
    if len(data) < 4:
        return data
    a, b = sorted(rng.randrange(len(data)) for _ in range(2))
    choice = rng.randrange(3)
    if choice == 0:
        return data[:a] + data[b:]  # delete
    if choice == 1:
        return data[:b] + data[a:b] + data[b:]  # duplicate
    return data[:a] + bytes(rng.getrandbits(8) for _ in range(min(64, b - a))) + data[a:]  # insert


MUTATORS: list[Callable[[random.Random, bytes], bytes]] = [_truncate, _flip, _lie_length, _splice]


def mutate(rng: random.Random, data: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        data = rng.choice(MUTATORS)(rng, data)
    return data


@functools.cache
def _bomb(seed: Seed, pixel_bytes: int) -> bytes:
    """A deflated explicit-VR dataset: the seed's header and `pixel_bytes` zeros of Pixel Data."""
    head = seed.data[: seed.data.find(b"\xe0\x7f\x10\x00")]
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(head + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", pixel_bytes))]
    zeros = bytes(4 * MIB)
    for _ in range(pixel_bytes // len(zeros)):
        out.append(z.compress(zeros))
    out.append(z.flush())
    data = b"".join(out)
    return data + b"\x00" if len(data) % 2 else data


# --------------------------------------------------------------------------- cases


@dataclass
class Outcome:
    kind: str  # the case family
    reply: str  # "status:0xC210", "abort", "closed", "timeout", "sent"
    bad_success: bool = False


def _store_case(port: int, seed: Seed, data: bytes | None, ts: str, cmd: dict[int, bytes]) -> str:
    a = rawdicom.RawAssociation(port, timeout=10)
    try:
        if not a.associate([(seed.sop_class, [ts])]) or not a.accepted:
            return "rejected"
        a.send_message(1, rawdicom.command(cmd), data)
        reply = a.reply(timeout=10)
        if reply.kind == "status":
            return f"status:0x{reply.status or 0:04X}" if reply.status is not None else "status:none"
        return reply.kind
    finally:
        a.close()


def case_dataset(rng: random.Random, port: int, seeds: list[Seed]) -> Outcome:
    seed = rng.choice(seeds)
    data = seed.data if rng.random() < 0.1 else mutate(rng, seed.data)
    cmd = rawdicom.store_command(seed.sop_class, seed.sop_instance, rng.randrange(1, 65535))
    reply = _store_case(port, seed, data, seed.transfer_syntax, cmd)
    return Outcome("dataset", reply, reply == "status:0x0000" and not complete(data, seed.transfer_syntax))


def case_deflated(rng: random.Random, port: int, seeds: list[Seed]) -> Outcome:
    explicit = [s for s in seeds if s.transfer_syntax == rawdicom.EXPLICIT_LE]
    seed = rng.choice(explicit)
    roll = rng.random()
    if roll < 0.1:
        data = _bomb(seed, rng.choice([64, 256, 1024]) * MIB)  # cached: built once per size
    elif roll < 0.5:
        data = _deflate(mutate(rng, seed.data))
    else:
        data = mutate(rng, _deflate(seed.data))
    cmd = rawdicom.store_command(seed.sop_class, seed.sop_instance, rng.randrange(1, 65535))
    reply = _store_case(port, seed, data, rawdicom.DEFLATED, cmd)
    return Outcome("deflated", reply, reply == "status:0x0000" and not complete(data, rawdicom.DEFLATED))


def _hostile_value(rng: random.Random) -> bytes | None:
    return rng.choice(
        [
            None,
            b"",
            b"  ",
            b"1." + b"2" * rng.randint(63, 80),
            b"1.2.3\n",
            b"../../etc/passwd",
            bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 9))),
            struct.pack("<H", rng.getrandbits(16)),
            struct.pack("<L", rng.getrandbits(32)),
        ]
    )


def case_command(rng: random.Random, port: int, seeds: list[Seed]) -> Outcome:
    seed = rng.choice(seeds)
    cmd = rawdicom.store_command(seed.sop_class, seed.sop_instance, rng.randrange(1, 65535))
    for _ in range(rng.randint(1, 3)):
        tag = rng.choice([*cmd.keys(), 0x00000120, 0x00000900, 0x00001030])
        value = _hostile_value(rng)
        if value is None:
            cmd.pop(tag, None)
        else:
            cmd[tag] = value
    data = seed.data if rng.random() < 0.7 else None
    if data is None:
        cmd[0x00000800] = rawdicom.us(0x0101)
    reply = _store_case(port, seed, data, seed.transfer_syntax, cmd)
    # Success needs the real UIDs: a command changed away from them must never be acknowledged.
    changed = cmd.get(0x00000002) != seed.sop_class.encode() or cmd.get(0x00001000) != seed.sop_instance.encode()
    return Outcome("command", reply, reply == "status:0x0000" and (changed or data is None))


def case_pdu(rng: random.Random, port: int, seeds: list[Seed]) -> Outcome:
    """Associate properly, then send PDUs that lie: unknown types, lengths, PDV items; then hang up."""
    a = rawdicom.RawAssociation(port, timeout=10)
    try:
        if not a.associate([(rawdicom.VERIFICATION, [rawdicom.IMPLICIT_LE])]):
            return Outcome("pdu", "rejected")
        for _ in range(rng.randint(1, 4)):
            pdu_type = rng.choice(
                [0x01, 0x02, 0x03, 0x04, 0x04, 0x04, 0x05, 0x06, 0x07, 0x00, 0xFF, rng.getrandbits(8)]
            )
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 512)))
            if pdu_type == 0x04 and rng.random() < 0.6:
                cmd = rawdicom.command(rawdicom.echo_command())
                pdv_len = rng.choice([len(cmd) + 2, 0, 1, 0xFFFFFFFF, len(cmd) + 100])
                body = struct.pack(">LBB", pdv_len, rng.choice([1, 0, 255]), rng.getrandbits(8)) + cmd
            declared = rng.choice([len(body), len(body), 0, 0xFFFFFFFF, len(body) + rng.randint(1, 1000)])
            if not a.send(struct.pack(">BBL", pdu_type, 0, declared) + body):
                break
        return Outcome("pdu", "sent")
    finally:
        a.close()


def case_association(rng: random.Random, port: int, seeds: list[Seed]) -> Outcome:
    """A mutated A-ASSOCIATE-RQ (or plain junk), then read whatever comes back briefly."""
    rq = rawdicom.associate_rq(
        [(rng.choice(seeds).sop_class, [rawdicom.EXPLICIT_LE]), (rawdicom.VERIFICATION, [rawdicom.IMPLICIT_LE])]
    )
    data = mutate(rng, rq) if rng.random() < 0.8 else bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(data)
            s.settimeout(0.5)
            try:
                head = s.recv(1)
            except TimeoutError:
                return Outcome("association", "timeout")
            return Outcome(
                "association", {b"\x02": "accepted", b"\x03": "reject", b"\x07": "abort"}.get(head, "closed")
            )
    except OSError:
        return Outcome("association", "closed")


CASES: list[tuple[float, Callable[[random.Random, int, list[Seed]], Outcome]]] = [
    (0.40, case_dataset),
    (0.20, case_deflated),
    (0.15, case_command),
    (0.15, case_pdu),
    (0.10, case_association),
]


def run_case(rng: random.Random, port: int, seeds: list[Seed]) -> Outcome:
    weights, funcs = zip(*CASES, strict=True)
    return rng.choices(funcs, weights)[0](rng, port, seeds)


# --------------------------------------------------------------------------- invariants


def rss_bytes(kind: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {kind} in /proc/self/status")


@dataclass
class Invariants:
    echo_ok: bool
    store_ok: bool
    rows: int
    files: int
    sha_mismatches: int
    rss: int

    @property
    def problems(self) -> list[str]:
        out = []
        if not self.echo_ok:
            out.append("C-ECHO failed")
        if not self.store_ok:
            out.append("a good store failed")
        if self.rows != self.files:
            out.append(f"{self.rows} database rows but {self.files} spool files")
        if self.sha_mismatches:
            out.append(f"{self.sha_mismatches} spool files differ from their recorded SHA-256")
        return out


def check_invariants(port: int, database_url: str, spool: Path, good_file: Path) -> Invariants:
    echo_ok = echoscu(port).returncode == 0
    store_ok = storescu(port, [good_file]).returncode == 0
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Instance.spool_path, Instance.sha256)).all()
    finally:
        engine.dispose()
    skip = {STAGING_DIRNAME, QUARANTINE_DIRNAME}  # transfers in flight; orphans from an earlier crash
    files = [p for p in spool.rglob("*") if p.is_file() and not skip & set(p.relative_to(spool).parts)]
    mismatches = 0
    for rel, sha in rows:
        path = spool / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            mismatches += 1
    return Invariants(echo_ok, store_ok, len(rows), len(files), mismatches, rss_bytes())


class TracebackCounter(logging.Handler):
    """Counts log records carrying an exception: an unhandled error somewhere in the listener."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.count += 1
            if len(self.first) < 5:
                self.first.append(f"{record.name}: {record.getMessage()[:200]}")


@dataclass
class Campaign:
    """Figures of one fuzzing run."""

    cases: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    families: Counter[str] = field(default_factory=Counter)
    bad_successes: list[str] = field(default_factory=list)
    invariant_failures: list[str] = field(default_factory=list)
    peak_rss_growth: int = 0

    def summary(self) -> str:
        lines = [
            f"cases: {self.cases}",
            "families: " + ", ".join(f"{k} {v}" for k, v in sorted(self.families.items())),
            "replies: " + ", ".join(f"{k} {v}" for k, v in self.replies.most_common()),
            f"success for bad data: {len(self.bad_successes)}",
            f"invariant failures: {len(self.invariant_failures)}",
            f"listener peak RSS growth: {self.peak_rss_growth / MIB:.0f} MiB",
        ]
        return "\n".join(lines)


def fuzz(
    port: int,
    database_url: str,
    spool: Path,
    *,
    cases: int,
    seed: int,
    batch: int = 50,
    progress: Callable[[Campaign], None] | None = None,
) -> Campaign:
    """Run `cases` seeded cases against a listener on `port`, checking the invariants after every batch."""
    rng = random.Random(seed)
    seeds = load_seeds()
    good = shared_file("dicom", "dx_for_presentation_animal_lateral.dcm")
    campaign = Campaign()
    baseline = rss_bytes()
    for i in range(cases):
        outcome = run_case(rng, port, seeds)
        campaign.cases += 1
        campaign.families[outcome.kind] += 1
        campaign.replies[outcome.reply] += 1
        if outcome.bad_success:
            campaign.bad_successes.append(f"case {i} ({outcome.kind})")
        if (i + 1) % batch == 0 or i + 1 == cases:
            inv = check_invariants(port, database_url, spool, good)
            campaign.peak_rss_growth = max(campaign.peak_rss_growth, rss_bytes("VmHWM") - baseline)
            campaign.invariant_failures += [f"after case {i}: {p}" for p in inv.problems]
            if progress:
                progress(campaign)
    return campaign
