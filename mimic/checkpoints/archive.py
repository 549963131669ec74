"""PyTorch zip archives: bounded, unambiguous, and rebuilt so that what is scanned is what is loaded.

PyTorch's reader (``PyTorchStreamReader``, miniz) and Python's ``zipfile`` do not resolve an
archive the same way: torch takes the directory of the *first* central-directory entry as the
archive's root and looks every record up with ``mz_zip_reader_locate_file(..., flags=0)``, which
compares names case-insensitively (``data.pkl`` finds ``DATA.PKL``) and, with duplicates, returns
whichever its binary search hits; ``zipfile`` compares exactly and keeps the last duplicate. They
also locate the central directory differently when bytes are prepended (``zipfile`` shifts every
offset, miniz does not). So mimic

1. reads the end-of-central-directory record itself and refuses an archive whose central
   directory is not exactly where that record says, that ends with anything but that record, or
   that declares more than ``max_zip_members`` records -- before ``zipfile`` builds one object per
   record;
2. refuses ambiguous archives: duplicate names, names that differ only in case, records outside
   the first record's directory (several top-level directories), several pickles, TorchScript;
3. bounds the expanded size (``zip_expansion_ratio``) and the pickle (``max_pickle_bytes``);
4. hands torch a **new** archive, written here from exactly the records that were read and
   scanned (same names, stored), so torch cannot read anything else.
"""

from __future__ import annotations

import io
import struct
import zipfile

from mimic.checkpoints.limits import Limits
from mimic.checkpoints.messages import fail, names, over_limit, printable

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory, 22 bytes
_Z64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes, just before the EOCD
_Z64_EOCD = struct.Struct("<4sQ2H2L4Q")  # 56 bytes (without extensible data), just before the locator
_CD_ENTRY_SIZE = 46
_ALLOWED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def _corrupt(source: str, why: str) -> Exception:
    return fail(source, f"truncated or corrupt zip archive ({why})")


def count_records(data: bytes, source: str, limits: Limits) -> int:
    """Number of central-directory records, validated against the end record and the limits."""
    size = len(data)
    if size < _EOCD.size or data[size - _EOCD.size : size - _EOCD.size + 4] != b"PK\x05\x06":
        raise _corrupt(source, "it does not end with an end-of-central-directory record: truncated, or trailing bytes")
    _, disk, disk_cd, n_disk, n_total, size_cd, offset_cd, comment = _EOCD.unpack_from(data, size - _EOCD.size)
    end = size - _EOCD.size
    if comment:
        raise _corrupt(source, "the end record claims an archive comment that is not there")
    locator = end - _Z64_LOCATOR.size
    if locator >= 0 and data[locator : locator + 4] == b"PK\x06\x07":
        _, z_disk, z_offset, _disks = _Z64_LOCATOR.unpack_from(data, locator)
        record = locator - _Z64_EOCD.size
        if record < 0 or z_offset != record or z_disk:
            raise _corrupt(source, "the zip64 locator does not point at the zip64 end record")
        sig, rec_size, _, _, disk, disk_cd, n_disk, n_total, size_cd, offset_cd = _Z64_EOCD.unpack_from(data, record)
        if sig != b"PK\x06\x06" or rec_size != _Z64_EOCD.size - 12:
            raise _corrupt(source, "bad zip64 end record")
        end = record
    elif 0xFFFF in (n_disk, n_total) or 0xFFFFFFFF in (size_cd, offset_cd):
        raise _corrupt(source, "zip64 sizes without a zip64 end record")
    if disk or disk_cd or n_disk != n_total:
        raise fail(source, "refused: a multi-disk zip archive")
    if n_total > limits.max_zip_members:
        raise over_limit(source, "zip records", n_total, "max_zip_members", limits.max_zip_members)
    if offset_cd + size_cd != end:
        raise _corrupt(source, "the central directory is not where the end record says (bytes prepended or a lying offset)")
    pos, count = offset_cd, 0
    while pos < end:
        count += 1
        if count > n_total or pos + _CD_ENTRY_SIZE > end or data[pos : pos + 4] != b"PK\x01\x02":
            raise _corrupt(source, f"the central directory does not hold the {n_total} records its end record declares")
        name_len, extra_len, comment_len = struct.unpack_from("<3H", data, pos + 28)
        pos += _CD_ENTRY_SIZE + name_len + extra_len + comment_len
    if count != n_total or pos != end:
        raise _corrupt(source, f"the central directory holds {count} records, its end record declares {n_total}")
    return n_total


def _check_names(infos: list[zipfile.ZipInfo], source: str) -> str:
    """The archive's root directory (as torch determines it); refuse anything ambiguous."""
    folded: dict[str, str] = {}
    for info in infos:
        name = info.filename
        if not name.isprintable() or "\\" in name:
            raise fail(source, f"refused: zip record name {printable(name)!r} has control characters or backslashes")
        key = name.casefold()
        if key in folded:
            other = folded[key]
            what = "duplicate records" if other == name else "records whose names differ only in case"
            raise fail(
                source,
                f"refused: ambiguous zip archive: {what} {printable(other)!r} and {printable(name)!r} "
                "(PyTorch's lookup ignores case; which one is loaded would depend on the reader)",
            )
        folded[key] = name
    root, slash, _ = infos[0].filename.partition("/")
    if not slash:
        raise fail(source, f"a zip archive whose first record {printable(infos[0].filename)!r} is not in a directory: not a PyTorch checkpoint")
    tops = sorted({i.filename.partition("/")[0] for i in infos} - {root})
    if tops:
        raise fail(
            source,
            f"refused: ambiguous zip archive: records under several top-level directories ({names([root, *tops])}); "
            "PyTorch reads only the first one's",
        )
    return root


class TorchZip:
    """A validated PyTorch zip archive: :meth:`read_pickle` to scan, then :meth:`rebuild` for torch.

    Everything that can be checked from the central directory is checked in the constructor,
    before a single record is decompressed.
    """

    def __init__(self, data: bytes, source: str, limits: Limits) -> None:
        self.source = source
        n = count_records(data, source, limits)
        try:
            self.archive = zipfile.ZipFile(io.BytesIO(data))
            infos = self.archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise _corrupt(source, printable(str(exc), 120)) from None
        if not infos:
            raise fail(source, "an empty zip archive, not a PyTorch checkpoint")
        if len(infos) != n:
            raise _corrupt(source, f"{len(infos)} records read, {n} declared")
        expanded = sum(i.file_size for i in infos)
        if expanded > limits.zip_expansion_bound(len(data)):
            raise fail(
                source,
                f"refused: the zip records expand to {expanded} bytes from a {len(data)}-byte file (a zip bomb? "
                f"limit zip_expansion_ratio={limits.zip_expansion_ratio} + zip_expansion_slack="
                f"{limits.zip_expansion_slack}; PyTorch stores records uncompressed)",
            )
        pickles = [i for i in infos if i.filename.casefold().endswith(".pkl")]
        if not any(i.filename.casefold().endswith("data.pkl") for i in pickles):
            if any(i.filename.casefold().endswith(".npy") for i in infos):
                raise fail(source, "a numpy .npz archive, not a model checkpoint")
            raise fail(source, "a zip archive without data.pkl: not a PyTorch checkpoint")
        root = _check_names(infos, source)
        if any(i.filename.startswith(f"{root}/code/") or i.filename == f"{root}/constants.pkl" for i in infos):
            raise fail(source, "refused: a TorchScript archive (it contains code); save and load a state_dict instead")
        if len(pickles) > 1:
            raise fail(
                source, f"refused: ambiguous zip archive: {len(pickles)} pickle records ({names(i.filename for i in pickles)})"
            )
        if pickles[0].filename != f"{root}/data.pkl":
            raise fail(
                source, f"refused: the pickle record is {printable(pickles[0].filename)!r}, PyTorch reads {root}/data.pkl"
            )
        for info in infos:
            if info.compress_type not in _ALLOWED_COMPRESSION or info.flag_bits & 0x1:
                raise fail(source, f"refused: zip record {printable(info.filename)!r} is encrypted or uses an unusual compression")
        if pickles[0].file_size > limits.max_pickle_bytes:
            raise over_limit(source, "data.pkl bytes", pickles[0].file_size, "max_pickle_bytes", limits.max_pickle_bytes)
        self.infos = infos
        self.pickle_info = pickles[0]

    def _read(self, info: zipfile.ZipInfo) -> bytes:
        try:
            out = self.archive.read(info)
        except Exception as exc:  # noqa: BLE001 - zlib/CRC/EOF/header errors of a damaged archive
            raise _corrupt(self.source, printable(str(exc) or type(exc).__name__, 120)) from None
        if len(out) != info.file_size:
            raise _corrupt(self.source, f"record {printable(info.filename)!r} has {len(out)} bytes, declared {info.file_size}")
        return out

    def read_pickle(self) -> bytes:
        return self._read(self.pickle_info)

    def rebuild(self) -> bytes:
        """A new archive holding exactly the records read here (same names and order, stored)."""
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as new:
            for info in self.infos:
                record = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                new.writestr(record, self._read(info))
        self.archive.close()
        return out.getvalue()
