"""The shard reader's own tar parser (slip.data.tars) against Python's tarfile: every tar
format tarfile writes, the members webdataset skips, and the errors it counts."""
from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from slip.data import tars as T


def _tar(members, fmt=tarfile.PAX_FORMAT) -> bytes:
    """A tar of ``(name, data)`` regular files; ``data`` None makes a directory, a str a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _samples(path, errors=None):
    errors = [] if errors is None else errors
    return [{k: v for k, v in s.items() if not k.startswith("__") or k in ("__key__", "__offset__")}
            for s in T.ReadShards(errors.append)([{"url": str(path)}])]


def _by_tarfile(data: bytes):
    """(name, regular, header offset, bytes) of each member, as Python's tarfile reads them."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(i.name, i.isreg(), i.offset, tar.extractfile(i).read() if i.isreg() else None) for i in tar]


LONG = "d" * 120 + "/sample-0001"  # a long name: GNU long-name header, pax path or ustar prefix
MEMBERS = [
    ("a/0001.jpg", b"\xff\xd8jpeg" * 100), ("a/0001.txt", "caption é".encode()), ("a/0001.json", b"{}"),
    ("a/", None), ("a/0002.jpg", b""), ("a/0002.txt", b"x" * 512), ("a/link.txt", "0001.txt"),
    ("__meta__", b"skipped"), (LONG + ".jpg", b"long" * 300), (LONG + ".txt", b"long name"),
    ("ünï/0003.jpg", b"\x00" * 1000), ("ünï/0003.TXT", b"upper-case extension"),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_read_as_tarfile_reads_them(fmt):
    members = [m for m in MEMBERS if fmt != tarfile.USTAR_FORMAT or m[0].isascii()]
    data = _tar(members, fmt)
    ours = [(name, regular, offset, read() if regular else None)
            for name, regular, offset, read in T._members(io.BytesIO(data), seekable=True)]
    assert ours == _by_tarfile(data)


def test_a_global_pax_header_belongs_to_no_member():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "made here"}) as tar:
        for name, data in MEMBERS[:3] + [(LONG + ".jpg", b"long")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    ours = [(name, regular, offset, read()) for name, regular, offset, read in T._members(io.BytesIO(data), seekable=True)]
    assert ours == _by_tarfile(data) and ours[0][2] > 0


def test_samples_group_members_and_skip_what_webdataset_skips(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(_tar(MEMBERS))
    samples = _samples(path)
    assert [s["__key__"] for s in samples] == ["a/0001", "a/0002", LONG, "ünï/0003"]
    assert samples[0]["txt"] == "caption é".encode() and samples[1]["jpg"] == b""
    assert samples[3]["txt"] == b"upper-case extension"
    assert "link.txt" not in str(samples) and all("meta" not in s for s in samples)
    # Each sample's offset is its first member's header: reading from there gives the sample again.
    with open(path, "rb") as stream:
        for s in samples:
            again = T.read_sample(stream, str(path), s["__offset__"], s["__key__"])
            assert {k: v for k, v in again.items() if not k.startswith("__")} == {
                k: v for k, v in s.items() if not k.startswith("__")}


def test_a_compressed_shard_is_read_by_tarfile_without_offsets(tmp_path):
    path = tmp_path / "shard.tar.gz"
    path.write_bytes(gzip.compress(_tar(MEMBERS[:3])))
    errors = []
    samples = list(T.ReadShards(errors.append)([{"url": str(path)}]))
    assert errors == [] and [s["__key__"] for s in samples] == ["a/0001"]
    assert samples[0]["__offset__"] is None and samples[0]["txt"] == "caption é".encode()


def test_a_bad_header_after_the_first_sample_is_an_error_and_keeps_what_came_before(tmp_path):
    data = bytearray(_tar(MEMBERS[:6], tarfile.USTAR_FORMAT))
    second = next(o for n, _, o, _ in _by_tarfile(bytes(data)) if n == "a/0002.jpg")
    data[second + 10] ^= 0xFF  # the name changes, the checksum no longer holds
    (tmp_path / "bad.tar").write_bytes(data)
    errors = []
    samples = _samples(tmp_path / "bad.tar", errors)
    assert [s["__key__"] for s in samples] == ["a/0001"]
    assert len(errors) == 1 and "checksum" in str(errors[0]) and "bad.tar" in str(errors[0])
    # A header cut short, and data cut short, are errors too; the sample being read keeps the
    # members read before.
    data = _tar(MEMBERS[:6], tarfile.USTAR_FORMAT)
    txt = next(o for n, _, o, _ in _by_tarfile(data) if n == "a/0002.txt")
    for cut, what in ((txt + 100, "header cut short"), (txt + 512 + 100, "unexpected end of data")):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        errors = []
        samples = _samples(tmp_path / "cut.tar", errors)
        assert [s["__key__"] for s in samples] == ["a/0001", "a/0002"] and "txt" not in samples[1]
        assert len(errors) == 1 and what in str(errors[0])


@pytest.mark.parametrize("content, message", [(b"", "empty file"), (bytes(1024), "end of file header"),
                                              (b"\x00\x01garbage" * 100, "invalid number")])
def test_an_empty_or_garbage_shard_is_an_error(tmp_path, content, message):
    (tmp_path / "s.tar").write_bytes(content)
    errors = []
    assert _samples(tmp_path / "s.tar", errors) == []
    assert len(errors) == 1 and message in str(errors[0])


def test_numbers_in_base_256_and_octal():
    assert T._number(b"0000644\x00", 0) == 0o644
    assert T._number(b"\x80" + (12345678901).to_bytes(11, "big"), 0) == 12345678901
    with pytest.raises(tarfile.ReadError, match="invalid number"):
        T._number(b"12x\x00", 7)
