"""Format detection from magic bytes (never from the file name), and the formats refused outright."""

from __future__ import annotations

import io
import re
import struct
import tarfile

from mimic.checkpoints.messages import fail

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
NPY_MAGIC = b"\x93NUMPY"
GZIP_MAGIC = b"\x1f\x8b"
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's legacy (pre-1.6, non-zip) format

REWRITE_HINT = "re-save the weights with a current PyTorch (torch.save of a state_dict) or safetensors"


def looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # a bad byte that is not just a character cut at the end
            return False
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * len(text)


def is_safetensors(data: bytes) -> bool:
    if len(data) < 9 or data[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 0 < n < (1 << 32)


def sniff(data: bytes) -> str:
    """``zip``, ``safetensors``, ``npy``, ``tar``, ``gzip``, ``pickle`` (protocol 2+) or ``unknown``."""
    if data.startswith(ZIP_MAGIC) or data.startswith(EMPTY_ZIP_MAGIC):
        return "zip"
    if is_safetensors(data):
        return "safetensors"
    if data.startswith(NPY_MAGIC):
        return "npy"
    if len(data) >= 262 and data[257:262] == b"ustar":
        return "tar"
    if data.startswith(GZIP_MAGIC):
        return "gzip"
    if data[:1] == b"\x80":
        return "pickle"
    return "unknown"


def refuse_npy(data: bytes, source: str) -> Exception:
    try:
        major = data[6]
        if major == 1:
            (hlen,) = struct.unpack("<H", data[8:10])
            header = data[10 : 10 + hlen].decode("latin-1")
        else:
            (hlen,) = struct.unpack("<I", data[8:12])
            header = data[12 : 12 + min(hlen, 1 << 16)].decode("utf-8")
    except (IndexError, struct.error, UnicodeDecodeError):
        header = ""
    if re.search(r"'descr':\s*'\|?O'", header):
        return fail(
            source,
            "refused: a numpy object array (it holds pickled Python objects); only tensors and plain data are loaded",
        )
    return fail(source, "a numpy .npy array file, not a model checkpoint")


def refuse_tar(data: bytes, source: str, max_members: int) -> Exception:
    names: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for i, member in enumerate(tar):  # streamed: a tar with millions of members is not listed in full
                if i >= max_members:
                    break
                names.append(member.name)
    except (tarfile.TarError, OSError, EOFError, ValueError):
        pass
    what = "the legacy PyTorch tar format" if "pickle" in names else "a tar archive"
    return fail(source, f"refused: {what} cannot be loaded without executing pickled code; {REWRITE_HINT}")


def refuse_unknown(data: bytes, source: str) -> Exception:
    """Not a pickle, zip, safetensors, numpy, tar or gzip file: text or random bytes."""
    if looks_like_text(data[:512]):  # never quoted: a message must not carry the file's content
        return fail(source, "a text file, not a model checkpoint (an HTML error page or a Git LFS pointer?)")
    return fail(
        source,
        "unrecognised file format (not a PyTorch zip or legacy checkpoint, not safetensors); "
        "the file may be truncated or corrupt",
    )
