"""The shard tar reader (data/samples.py) against tarfile: same members, same refusals."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from attent_scale.data.samples import _tar_files, read_samples, write_samples


def _tar(fmt: int, names: list[str]) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w|", format=fmt) as tf:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 7 + i * 600  # members that end inside, and past, a 512-byte block
            tf.addfile(info, io.BytesIO((bytes(range(256)) * 8)[: info.size]))
    return bio.getvalue()


@pytest.mark.parametrize("fmt,long", [(tarfile.PAX_FORMAT, "x" * 120 + "/0000000002.tokens.u16"),
                                      (tarfile.GNU_FORMAT, "y" * 130 + "/0000000002.tokens.u16"),
                                      (tarfile.USTAR_FORMAT, "p" * 90 + "/" + "q" * 60)])
def test_members_match_tarfile_for_every_header_format(fmt, long):
    raw = _tar(fmt, ["a/0000000001.tokens.u16", long, "\u00fc.tokens.u16"])
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tf:
        want = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    assert list(_tar_files(io.BytesIO(raw))) == want and len(want) == 3


def test_written_samples_read_back():
    rng = np.random.default_rng(0)
    rows = [(i, rng.integers(0, 70000, 9, dtype=np.uint32), None if i % 2 else np.ones(9, np.uint8))
            for i in range(5)]
    bio = io.BytesIO()
    write_samples(bio, rows, "uint32")
    got = list(read_samples(io.BytesIO(bio.getvalue())))
    assert [r.id for r in got] == list(range(5))
    for (_sid, tokens, mask), raw in zip(rows, got, strict=True):
        assert np.array_equal(np.frombuffer(raw.fields["tokens.u32"], np.uint32), tokens)
        assert ("mask.u8" in raw.fields) == (mask is not None)


def test_refuses_what_tarfile_refuses():
    raw = _tar(tarfile.USTAR_FORMAT, ["0000000001.tokens.u16", "0000000002.tokens.u16"])
    bad_sum = bytearray(raw)
    bad_sum[512 + 5] ^= 0xFF  # a byte of the first file member's header: its checksum no longer matches
    cases = {b"": "empty file", b"garbage" * 100: "invalid header", raw[:100]: "truncated header",
             raw[:2048 + 100]: "unexpected end of data", bytes(bad_sum): "invalid header"}
    for data, why in cases.items():
        with pytest.raises(tarfile.ReadError, match=why):
            list(_tar_files(io.BytesIO(data)))
    assert list(_tar_files(io.BytesIO(bytes(1024)))) == []  # only the end-of-archive marker


def test_a_gnu_symlink_with_a_long_target_is_read_past():
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w|", format=tarfile.GNU_FORMAT) as tf:
        link = tarfile.TarInfo("l" * 120)
        link.type, link.linkname = tarfile.SYMTYPE, "t" * 130  # a 'K' long-link-name header, then 'L'
        tf.addfile(link)
        info = tarfile.TarInfo("0000000001.tokens.u16")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    assert list(_tar_files(io.BytesIO(bio.getvalue()))) == [("0000000001.tokens.u16", b"abc")]
