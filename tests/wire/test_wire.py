"""WIRE.md's behaviours of mcpcontainer.ContainerService, checked from a client's view.

Each test names the WIRE.md rule it checks. Files are prepared directly on the server's data
dir (the server runs on this machine) and read back through the API, or the other way round.
"""

import os
import queue
import socket
import stat
import time

import grpc
import pytest

from conftest import TEMPLATE_FILES, make_dirs, pb

STDOUT, STDERR, EXIT = 0, 1, 2


def put(path, content, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    if mode is not None:
        os.chmod(path, mode)


def get(path):
    with open(path, "rb") as f:
        return f.read()


def perm(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as exc:
        fn()
    return exc.value.code()


def numbered(lines, start=1):
    return "".join("%6d\t%s\n" % (i, line) for i, line in enumerate(lines, start))


def read(stub, path, offset=0, n=0):
    return stub.ReadFile(pb.ReadFileRequest(path=path, line_offset=offset, n_lines=n))


# --------------------------------------------------------------------------------- ReadFile


def test_readfile_numbered_window_format(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), "alpha\nbeta\ngamma\n")
    r = read(stub, rel + "/f.txt")
    assert r.content == "     1\talpha\n     2\tbeta\n     3\tgamma\n"
    assert r.total_lines == 3
    assert r.binary is False


def test_readfile_line_numbers_right_aligned_in_six_columns(stub, d):
    rel, ab = d
    lines = ["x"] * 123456
    put(os.path.join(ab, "big.txt"), "\n".join(lines) + "\n")
    r = read(stub, rel + "/big.txt", offset=123455, n=2)
    assert r.content == "123455\tx\n123456\tx\n"
    assert r.total_lines == 123456


@pytest.mark.parametrize("offset,n,expect", [
    (2, 1, [2]),
    (2, 2, [2, 3]),
    (3, 0, [3, 4, 5]),
    (0, 2, [1, 2]),
    (-7, 2, [1, 2]),
    (1, 0, [1, 2, 3, 4, 5]),
])
def test_readfile_offset_is_one_based_and_below_one_means_one(stub, d, offset, n, expect):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), "".join("line%d\n" % i for i in range(1, 6)))
    r = read(stub, rel + "/f.txt", offset, n)
    assert r.content == "".join("%6d\tline%d\n" % (i, i) for i in expect)
    assert r.total_lines == 5


@pytest.mark.parametrize("n,expect", [(0, 200), (-1, 200), (5, 5), (200, 200), (201, 200), (100000, 200)])
def test_readfile_n_lines_capped_at_200(stub, d, n, expect):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), "".join("%d\n" % i for i in range(1, 501)))
    r = read(stub, rel + "/f.txt", 1, n)
    assert r.content == "".join("%6d\t%d\n" % (i, i) for i in range(1, expect + 1))
    assert r.total_lines == 500


def test_readfile_window_from_offset_with_cap(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), "".join("%d\n" % i for i in range(1, 501)))
    r = read(stub, rel + "/f.txt", 250, 0)
    assert r.content == "".join("%6d\t%d\n" % (i, i) for i in range(250, 450))
    assert r.total_lines == 500


def test_readfile_long_line_cut_to_1000_chars_with_ellipsis(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), "a" * 1500 + "\n" + "b" * 1000 + "\n" + "c" * 1001 + "\n")
    r = read(stub, rel + "/f.txt")
    assert r.content == numbered(["a" * 1000 + "...", "b" * 1000, "c" * 1000 + "..."])
    assert r.total_lines == 3


def test_readfile_cut_counts_unicode_scalar_values_not_bytes(stub, d):
    rel, ab = d
    # 1001 two-byte chars and 1000 four-byte chars: only the first is cut.
    put(os.path.join(ab, "f.txt"), "é" * 1001 + "\n" + "😀" * 1000 + "\n")
    r = read(stub, rel + "/f.txt", 1, 1)
    assert r.content == numbered(["é" * 1000 + "..."])
    r = read(stub, rel + "/f.txt", 2, 1)
    assert r.content == numbered(["😀" * 1000], start=2)


def test_readfile_window_stops_before_5120_bytes(stub, d):
    rel, ab = d
    # Each numbered line is 6 + 1 + 100 + 1 = 108 bytes: 47 fit (5076), 48 would pass 5120.
    put(os.path.join(ab, "f.txt"), ("b" * 100 + "\n") * 100)
    r = read(stub, rel + "/f.txt")
    assert r.content == numbered(["b" * 100] * 47)
    assert len(r.content.encode()) == 5076
    assert r.total_lines == 100


def test_readfile_window_may_fill_exactly_5120_bytes(stub, d):
    rel, ab = d
    # 10 numbered lines of 512 bytes are exactly 5120 bytes: that does not pass the limit.
    put(os.path.join(ab, "f.txt"), ("e" * 504 + "\n") * 11)
    r = read(stub, rel + "/f.txt")
    assert len(r.content.encode()) == 5120
    assert r.content == numbered(["e" * 504] * 10)
    assert r.total_lines == 11


def test_readfile_5120_limit_is_in_bytes(stub, d):
    rel, ab = d
    # A cut line of 1000 two-byte chars is 7 + 2000 + 3 + 1 = 2011 bytes: two fit, three do not.
    put(os.path.join(ab, "f.txt"), ("é" * 1200 + "\n") * 5)
    r = read(stub, rel + "/f.txt")
    assert r.content == numbered(["é" * 1000 + "..."] * 2)
    assert r.total_lines == 5


def test_readfile_total_lines_counts_past_the_window(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), "x\n" * 1234)
    r = read(stub, rel + "/f.txt", 10, 3)
    assert r.content == numbered(["x"] * 3, start=10)
    assert r.total_lines == 1234


@pytest.mark.parametrize("content,lines", [
    (b"", []),
    (b"\n", [""]),
    (b"a", ["a"]),
    (b"a\nb", ["a", "b"]),
    (b"a\nb\n", ["a", "b"]),
    (b"a\n\n", ["a", ""]),
    (b"a\r\nb\r\n", ["a", "b"]),
    (b"a\r\nb\r", ["a", "b"]),
    (b"a\rb\n", ["a\rb"]),
    (b"a\r\r\n", ["a\r"]),
    (b"\n\n\n", ["", "", ""]),
])
def test_readfile_splits_lines_like_go_scanlines(stub, d, content, lines):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), content)
    r = read(stub, rel + "/f.txt")
    assert r.content == numbered(lines)
    assert r.total_lines == len(lines)
    assert r.binary is False


def test_readfile_nul_in_first_8k_is_binary_without_content(stub, d):
    rel, ab = d
    put(os.path.join(ab, "a.bin"), b"hello\x00world\n")
    put(os.path.join(ab, "b.bin"), b"x" * 8000 + b"\x00" + b"y\n")
    for name in ("a.bin", "b.bin"):
        r = read(stub, rel + "/" + name)
        assert r.binary is True, name
        assert r.content == "", name


def test_readfile_nul_after_first_8k_is_text(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), b"a\n" * 5000 + b"\x00\n")
    r = read(stub, rel + "/f.txt", 1, 2)
    assert r.binary is False
    assert r.content == numbered(["a", "a"])
    assert r.total_lines == 5001


def test_readfile_missing_is_not_found(stub, d):
    rel, _ = d
    assert code_of(lambda: read(stub, rel + "/nope.txt")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: read(stub, rel + "/no/such/dir/f")) == grpc.StatusCode.NOT_FOUND


def test_readfile_empty_path_is_invalid_argument(stub):
    assert code_of(lambda: read(stub, "")) == grpc.StatusCode.INVALID_ARGUMENT


def test_relative_paths_join_the_data_dir_absolute_paths_are_used_as_is(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), "one\n")
    assert read(stub, rel + "/f.txt").content == numbered(["one"])
    assert read(stub, os.path.join(ab, "f.txt")).content == numbered(["one"])
    assert read(stub, "./" + rel + "//./f.txt").content == numbered(["one"])
    assert read(stub, rel + "/x/../f.txt").content == numbered(["one"])
    assert read(stub, ab + "/./x/..//f.txt").content == numbered(["one"])


# ------------------------------------------------------------------------ WriteFile / WriteRaw


def test_writefile_creates_file_0644_and_parents_0755(stub, d):
    rel, ab = d
    stub.WriteFile(pb.WriteFileRequest(path=rel + "/p/q/new.txt", content=b"hi\n"))
    f = os.path.join(ab, "p", "q", "new.txt")
    assert get(f) == b"hi\n"
    assert perm(f) == 0o644
    assert perm(os.path.join(ab, "p")) == 0o755
    assert perm(os.path.join(ab, "p", "q")) == 0o755


def test_writefile_overwrite_keeps_mode_and_leaves_exactly_new_bytes(stub, d):
    rel, ab = d
    f = os.path.join(ab, "f.sh")
    put(f, b"a much longer old content\n" * 10, mode=0o750)
    stub.WriteFile(pb.WriteFileRequest(path=rel + "/f.sh", content=b"new"))
    assert get(f) == b"new"
    assert perm(f) == 0o750
    put(f, b"x", mode=0o600)
    stub.WriteFile(pb.WriteFileRequest(path=rel + "/f.sh", content=b""))
    assert get(f) == b""
    assert perm(f) == 0o600


def test_writefile_bytes_are_exact(stub, d):
    rel, ab = d
    payload = bytes(range(256)) * 3 + b"\x00\xff\r\n"
    stub.WriteFile(pb.WriteFileRequest(path=rel + "/b.bin", content=payload))
    assert get(os.path.join(ab, "b.bin")) == payload


def test_writefile_absolute_path_used_as_is(stub, d):
    _, ab = d
    stub.WriteFile(pb.WriteFileRequest(path=ab + "/abs.txt", content=b"abs"))
    assert get(os.path.join(ab, "abs.txt")) == b"abs"


def test_writefile_cleans_path_so_dotdot_creates_no_dir(stub, d):
    rel, ab = d
    stub.WriteFile(pb.WriteFileRequest(path=rel + "/sub/../f.txt", content=b"c"))
    assert get(os.path.join(ab, "f.txt")) == b"c"
    assert not os.path.exists(os.path.join(ab, "sub"))


def test_writefile_empty_path_is_invalid_argument(stub):
    assert code_of(lambda: stub.WriteFile(pb.WriteFileRequest(path="", content=b"x"))) == \
        grpc.StatusCode.INVALID_ARGUMENT


def write_raw(stub, chunks):
    return stub.WriteRaw(iter(chunks))


def test_writeraw_path_in_first_chunk_and_bytes_written_total(stub, d):
    rel, ab = d
    parts = [b"first-", b"second-" * 1000, b"", b"\x00third"]
    chunks = [pb.WriteRawChunk(path=rel + "/up/load.bin", data=parts[0])]
    chunks += [pb.WriteRawChunk(data=p) for p in parts[1:]]
    r = write_raw(stub, chunks)
    f = os.path.join(ab, "up", "load.bin")
    assert r.bytes_written == sum(len(p) for p in parts)
    assert get(f) == b"".join(parts)
    assert perm(f) == 0o644
    assert perm(os.path.join(ab, "up")) == 0o755


def test_writeraw_large_upload(stub, d):
    rel, ab = d
    blob = os.urandom(3 * 1024 * 1024 + 17)
    step = 64 * 1024
    chunks = [pb.WriteRawChunk(path=rel + "/big.bin", data=blob[:step])]
    chunks += [pb.WriteRawChunk(data=blob[i:i + step]) for i in range(step, len(blob), step)]
    r = write_raw(stub, chunks)
    assert r.bytes_written == len(blob)
    assert get(os.path.join(ab, "big.bin")) == blob


def test_writeraw_overwrite_keeps_mode_and_leaves_only_the_file(stub, d):
    rel, ab = d
    f = os.path.join(ab, "f.bin")
    put(f, b"old old old old old", mode=0o700)
    r = write_raw(stub, [pb.WriteRawChunk(path=rel + "/f.bin", data=b"ne"), pb.WriteRawChunk(data=b"w")])
    assert r.bytes_written == 3
    assert get(f) == b"new"
    assert perm(f) == 0o700
    assert sorted(os.listdir(ab)) == ["f.bin"]  # no temp file left behind


def test_writeraw_missing_path_in_first_chunk_is_invalid_argument(stub):
    assert code_of(lambda: write_raw(stub, [pb.WriteRawChunk(data=b"x")])) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_writeraw_path_only_in_a_later_chunk_is_invalid_argument(stub, d):
    rel, ab = d
    chunks = [pb.WriteRawChunk(data=b"x"), pb.WriteRawChunk(path=rel + "/late.bin", data=b"y")]
    assert code_of(lambda: write_raw(stub, chunks)) == grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.exists(os.path.join(ab, "late.bin"))


def test_writeraw_without_any_chunk_is_invalid_argument(stub):
    assert code_of(lambda: write_raw(stub, [])) == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------------- ReadRaw


def test_readraw_streams_chunks_of_at_most_64k(stub, d):
    rel, ab = d
    blob = os.urandom(200 * 1024 + 5)
    put(os.path.join(ab, "f.bin"), blob)
    chunks = [c.data for c in stub.ReadRaw(pb.ReadRawRequest(path=rel + "/f.bin"))]
    assert b"".join(chunks) == blob
    assert max(len(c) for c in chunks) <= 64 * 1024
    assert len(chunks) >= 4


def test_readraw_empty_file(stub, d):
    rel, ab = d
    put(os.path.join(ab, "empty"), b"")
    chunks = [c.data for c in stub.ReadRaw(pb.ReadRawRequest(path=rel + "/empty"))]
    assert b"".join(chunks) == b""


def test_readraw_missing_is_not_found(stub, d):
    rel, _ = d
    assert code_of(lambda: list(stub.ReadRaw(pb.ReadRawRequest(path=rel + "/nope")))) == \
        grpc.StatusCode.NOT_FOUND


def test_readraw_empty_path_is_invalid_argument(stub):
    assert code_of(lambda: list(stub.ReadRaw(pb.ReadRawRequest(path="")))) == \
        grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------------- ListDir


def listdir(stub, path, recursive=False):
    return list(stub.ListDir(pb.ListDirRequest(path=path, recursive=recursive)).entries)


def test_listdir_children_sorted_by_name(stub, d):
    rel, ab = d
    for name in ("b", "a", "C", "a.txt", "_x"):
        put(os.path.join(ab, name), name * 3)
    os.makedirs(os.path.join(ab, "d", "inner"))
    put(os.path.join(ab, "d", "inner", "deep"), "z")
    es = listdir(stub, rel)
    assert [e.path for e in es] == ["C", "_x", "a", "a.txt", "b", "d"]
    by = {e.path: e for e in es}
    assert by["a.txt"].size == 15 and not by["a.txt"].is_dir
    assert by["d"].is_dir


def test_listdir_recursive_is_walkdir_preorder(stub, d):
    rel, ab = d
    put(os.path.join(ab, "a", "y", "z"), "1")
    put(os.path.join(ab, "a", "x"), "1")
    put(os.path.join(ab, "a.txt"), "1")
    put(os.path.join(ab, "b"), "1")
    os.makedirs(os.path.join(ab, "c"))
    put(os.path.join(ab, "a-b", "k"), "1")
    es = listdir(stub, rel, recursive=True)
    # '-' (0x2d) < '.' (0x2e) < '/' (0x2f): a pre-order walk differs from sorting full paths.
    assert [e.path for e in es] == ["a", "a/x", "a/y", "a/y/z", "a-b", "a-b/k", "a.txt", "b", "c"]
    assert [e.is_dir for e in es] == [True, False, True, False, True, False, False, False, True]


def test_listdir_symlinks_are_links_and_not_descended(stub, d):
    rel, ab = d
    put(os.path.join(ab, "real", "inside"), "1")
    os.symlink("real", os.path.join(ab, "link"))
    os.symlink("/nonexistent/target", os.path.join(ab, "dangling"))
    for recursive in (False, True):
        es = listdir(stub, rel, recursive)
        paths = [e.path for e in es]
        assert "link/inside" not in paths
        by = {e.path: e for e in es}
        assert by["link"].mode == "Lrwxrwxrwx"
        assert by["link"].is_dir is False
        assert by["link"].size == len("real")
        assert by["dangling"].mode == "Lrwxrwxrwx"
    assert [e.path for e in listdir(stub, rel, True)] == ["dangling", "link", "real", "real/inside"]


def test_listdir_mode_strings_are_go_filemode(stub, d):
    rel, ab = d
    put(os.path.join(ab, "file"), "x", mode=0o644)
    put(os.path.join(ab, "exec"), "x", mode=0o755)
    put(os.path.join(ab, "private"), "x", mode=0o600)
    put(os.path.join(ab, "setuid"), "x", mode=0o4755)
    put(os.path.join(ab, "setgid"), "x", mode=0o2755)
    put(os.path.join(ab, "allbits"), "x", mode=0o7777)
    put(os.path.join(ab, "none"), "x", mode=0o000)
    os.makedirs(os.path.join(ab, "dir"))
    os.chmod(os.path.join(ab, "dir"), 0o755)
    os.makedirs(os.path.join(ab, "sticky"))
    os.chmod(os.path.join(ab, "sticky"), 0o1777)
    os.makedirs(os.path.join(ab, "sgdir"))
    os.chmod(os.path.join(ab, "sgdir"), 0o2775)
    os.symlink("file", os.path.join(ab, "link"))
    os.mkfifo(os.path.join(ab, "pipe"))
    os.chmod(os.path.join(ab, "pipe"), 0o644)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(ab, "sock"))
    os.chmod(os.path.join(ab, "sock"), 0o700)
    expected = {
        "file": "-rw-r--r--",
        "exec": "-rwxr-xr-x",
        "private": "-rw-------",
        "setuid": "urwxr-xr-x",
        "setgid": "grwxr-xr-x",
        "allbits": "ugtrwxrwxrwx",
        "none": "----------",
        "dir": "drwxr-xr-x",
        "sticky": "dtrwxrwxrwx",
        "sgdir": "dgrwxrwxr-x",
        "link": "Lrwxrwxrwx",
        "pipe": "prw-r--r--",
        "sock": "Srwx------",
    }
    try:
        os.mknod(os.path.join(ab, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chmod(os.path.join(ab, "null"), 0o666)
        expected["null"] = "Dcrw-rw-rw-"
    except PermissionError:
        pass
    try:
        got = {e.path: e.mode for e in listdir(stub, rel)}
    finally:
        sock.close()
    assert got == expected


def test_listdir_mod_time_is_rfc3339_seconds_utc_z(stub, d):
    rel, ab = d
    f = os.path.join(ab, "f")
    put(f, "x")
    # 2026-03-04T21:50:08.9Z: seconds precision truncates, it does not round.
    os.utime(f, ns=(1772661008_900000000, 1772661008_900000000))
    (e,) = listdir(stub, rel)
    assert e.mod_time == "2026-03-04T21:50:08Z"
    st = stub.Stat(pb.StatRequest(path=rel + "/f")).entry
    assert st.mod_time == "2026-03-04T21:50:08Z"


def test_listdir_mod_time_uses_the_servers_local_zone(spawn, tmp_path):
    if not os.path.exists("/usr/share/zoneinfo/Asia/Kolkata"):
        pytest.skip("no tzdata")
    data, template = make_dirs(str(tmp_path))
    srv = spawn(data_dir=data, template_dir=template, env={"TZ": "Asia/Kolkata"})
    put(os.path.join(data, "f"), "x")
    os.utime(os.path.join(data, "f"), (1772661008, 1772661008))
    es = {e.path: e for e in listdir(srv.stub, data)}
    assert es["f"].mod_time == "2026-03-05T03:20:08+05:30"


def test_listdir_empty_path_is_the_data_dir(stub, data):
    es = listdir(stub, "")
    assert [e.path for e in es] == sorted(os.listdir(data))
    assert [e.path for e in es] == [e.path for e in listdir(stub, data)]


def test_listdir_missing_is_not_found(stub, d):
    rel, _ = d
    assert code_of(lambda: listdir(stub, rel + "/nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: listdir(stub, rel + "/nope", True)) == grpc.StatusCode.NOT_FOUND


def test_listdir_sizes(stub, d):
    rel, ab = d
    put(os.path.join(ab, "seven"), b"1234567")
    put(os.path.join(ab, "s", "zero"), b"")
    es = {e.path: e for e in listdir(stub, rel, True)}
    assert es["seven"].size == 7
    assert es["s/zero"].size == 0


# ------------------------------------------------------------------------------------ Stat


def test_stat_file(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f.txt"), b"12345", mode=0o640)
    e = stub.Stat(pb.StatRequest(path=rel + "/f.txt")).entry
    assert (e.path, e.is_dir, e.size, e.mode) == ("f.txt", False, 5, "-rw-r-----")


def test_stat_follows_symlinks(stub, d):
    rel, ab = d
    put(os.path.join(ab, "target.txt"), b"123456789", mode=0o644)
    os.makedirs(os.path.join(ab, "tdir"))
    os.chmod(os.path.join(ab, "tdir"), 0o755)
    os.symlink("target.txt", os.path.join(ab, "flink"))
    os.symlink(os.path.join(ab, "tdir"), os.path.join(ab, "dlink"))
    e = stub.Stat(pb.StatRequest(path=rel + "/flink")).entry
    assert (e.path, e.is_dir, e.size, e.mode) == ("flink", False, 9, "-rw-r--r--")
    e = stub.Stat(pb.StatRequest(path=rel + "/dlink")).entry
    assert (e.path, e.is_dir, e.mode) == ("dlink", True, "drwxr-xr-x")


def test_stat_dangling_symlink_is_not_found(stub, d):
    rel, ab = d
    os.symlink("nowhere", os.path.join(ab, "dangling"))
    assert code_of(lambda: stub.Stat(pb.StatRequest(path=rel + "/dangling"))) == grpc.StatusCode.NOT_FOUND


def test_stat_data_dir_is_named_data(stub, data):
    for p in (".", data, data + "/", "x/..", data + "/./"):
        e = stub.Stat(pb.StatRequest(path=p)).entry
        assert (e.path, e.is_dir) == ("data", True), p
        assert e.mode.startswith("d"), p


def test_stat_root_is_slash(stub):
    for p in ("/", "//", "/./", "/.."):
        e = stub.Stat(pb.StatRequest(path=p)).entry
        assert (e.path, e.is_dir) == ("/", True), p


def test_stat_cleaned_path_base_name(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f"), "x")
    e = stub.Stat(pb.StatRequest(path=rel + "/sub/../f")).entry
    assert e.path == "f"


def test_stat_missing_is_not_found_and_empty_is_invalid(stub, d):
    rel, _ = d
    assert code_of(lambda: stub.Stat(pb.StatRequest(path=rel + "/nope"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.Stat(pb.StatRequest(path=""))) == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------- Mkdir, Rename, Delete


def test_mkdir_creates_all_parents(stub, d):
    rel, ab = d
    stub.Mkdir(pb.MkdirRequest(path=rel + "/m/n/o"))
    assert os.path.isdir(os.path.join(ab, "m", "n", "o"))
    assert code_of(lambda: stub.Mkdir(pb.MkdirRequest(path=""))) == grpc.StatusCode.INVALID_ARGUMENT


def test_rename_moves_and_creates_new_parent(stub, d):
    rel, ab = d
    put(os.path.join(ab, "old.txt"), b"content")
    stub.Rename(pb.RenameRequest(old_path=rel + "/old.txt", new_path=rel + "/new/deep/n.txt"))
    assert not os.path.exists(os.path.join(ab, "old.txt"))
    assert get(os.path.join(ab, "new", "deep", "n.txt")) == b"content"
    put(os.path.join(ab, "dir", "f"), b"1")
    stub.Rename(pb.RenameRequest(old_path=rel + "/dir", new_path=rel + "/dir2"))
    assert get(os.path.join(ab, "dir2", "f")) == b"1"


def test_rename_empty_paths_are_invalid_argument(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f"), b"1")
    for old, new in (("", rel + "/g"), (rel + "/f", ""), ("", "")):
        assert code_of(lambda: stub.Rename(pb.RenameRequest(old_path=old, new_path=new))) == \
            grpc.StatusCode.INVALID_ARGUMENT
    assert os.path.exists(os.path.join(ab, "f"))


def test_rename_missing_source_is_not_found(stub, d):
    rel, _ = d
    assert code_of(lambda: stub.Rename(pb.RenameRequest(old_path=rel + "/nope", new_path=rel + "/x"))) == \
        grpc.StatusCode.NOT_FOUND


def test_delete_file_and_missing_path_succeeds(stub, d):
    rel, ab = d
    put(os.path.join(ab, "f"), b"1")
    stub.DeleteFile(pb.DeleteFileRequest(path=rel + "/f"))
    assert not os.path.exists(os.path.join(ab, "f"))
    stub.DeleteFile(pb.DeleteFileRequest(path=rel + "/f"))
    stub.DeleteFile(pb.DeleteFileRequest(path=rel + "/no/such/thing", recursive=True))


def test_delete_recursive_removes_a_tree(stub, d):
    rel, ab = d
    put(os.path.join(ab, "t", "a", "b", "c"), b"1")
    put(os.path.join(ab, "t", "x"), b"1")
    with pytest.raises(grpc.RpcError):
        stub.DeleteFile(pb.DeleteFileRequest(path=rel + "/t", recursive=False))
    assert os.path.exists(os.path.join(ab, "t", "x"))
    stub.DeleteFile(pb.DeleteFileRequest(path=rel + "/t", recursive=True))
    assert not os.path.exists(os.path.join(ab, "t"))


def test_delete_recursive_of_a_symlink_removes_only_the_link(stub, d):
    rel, ab = d
    put(os.path.join(ab, "keep", "precious"), b"1")
    os.symlink(os.path.join(ab, "keep"), os.path.join(ab, "ln"))
    stub.DeleteFile(pb.DeleteFileRequest(path=rel + "/ln", recursive=True))
    assert not os.path.lexists(os.path.join(ab, "ln"))
    assert get(os.path.join(ab, "keep", "precious")) == b"1"


def test_delete_empty_path_is_invalid_argument(stub):
    assert code_of(lambda: stub.DeleteFile(pb.DeleteFileRequest(path=""))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.DeleteFile(pb.DeleteFileRequest(path="", recursive=True))) == \
        grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------------ Exec


class ExecResult:
    def __init__(self, msgs):
        self.msgs = msgs
        self.stdout = b"".join(m.data for m in msgs if m.stream == STDOUT)
        self.stderr = b"".join(m.data for m in msgs if m.stream == STDERR)
        exits = [m for m in msgs if m.stream == EXIT]
        self.exits = exits
        self.code = exits[-1].exit_code if exits else None


def run(stub, command, stdin=(), timeout=None, **kw):
    first = pb.ExecInput(command=command, **kw)
    reqs = [first] + [pb.ExecInput(stdin_data=s) for s in stdin]
    msgs = list(stub.Exec(iter(reqs), timeout=timeout or 60))
    res = ExecResult(msgs)
    assert len(res.exits) == 1, "exactly one EXIT message"
    assert msgs[-1].stream == EXIT, "EXIT is the last message"
    return res


def test_exec_stdout_and_exit_zero(stub):
    r = run(stub, "echo hello; printf 'no newline'")
    assert r.stdout == b"hello\nno newline"
    assert r.stderr == b""
    assert r.code == 0


def test_exec_stderr_and_exit_code(stub):
    r = run(stub, "echo out; echo err >&2; exit 3")
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    assert r.code == 3


def test_exec_runs_under_bin_sh_c(stub):
    r = run(stub, 'echo "$0"; a=1; b=$((a+41)); echo $b; for i in 1 2; do echo $i; done')
    assert r.stdout == b"/bin/sh\n42\n1\n2\n"


def test_exec_command_not_found_is_127_with_message(stub):
    r = run(stub, "definitely-not-a-command-xyz")
    assert r.code == 127
    assert b"not found" in r.stderr
    assert r.stdout == b""


@pytest.mark.parametrize("sig", ["KILL", "TERM"])
def test_exec_exit_by_signal_is_minus_one(stub, sig):
    r = run(stub, "kill -%s $$" % sig)
    assert r.code == -1


def test_exec_timeout_kills_and_reports_minus_one(stub):
    t = time.time()
    r = run(stub, "echo started; sleep 30", timeout_seconds=1)
    assert r.code == -1
    assert r.stdout == b"started\n"
    assert time.time() - t < 10


def test_exec_timeout_kills_the_whole_process_group(stub, d):
    rel, ab = d
    marker = os.path.join(ab, "marker")
    r = run(stub, "(sleep 2; touch %s) & sleep 30" % marker, timeout_seconds=1)
    assert r.code == -1
    time.sleep(3)
    assert not os.path.exists(marker)


def test_exec_stdin_and_client_close_closes_childs_stdin(stub):
    r = run(stub, "cat; echo done", stdin=[b"abc", b"", b"def\n", b"\x00\xff"])
    assert r.stdout == b"abcdef\n\x00\xffdone\n"
    assert r.code == 0


def test_exec_streams_output_while_stdin_is_open(stub):
    q = queue.Queue()
    q.put(pb.ExecInput(command='read a; echo "got:$a"; read b; echo "got:$b"'))
    q.put(pb.ExecInput(stdin_data=b"first\n"))

    def reqs():
        while True:
            item = q.get()
            if item is None:
                return
            yield item

    call = stub.Exec(reqs(), timeout=30)
    out = b""
    msgs = []
    for m in call:
        msgs.append(m)
        if m.stream == STDOUT:
            out += m.data
            if out == b"got:first\n":
                # Only now send the second line: output arrived while stdin was still open.
                q.put(pb.ExecInput(stdin_data=b"second\n"))
                q.put(None)
    assert out == b"got:first\ngot:second\n"
    assert msgs[-1].stream == EXIT and msgs[-1].exit_code == 0


def test_exec_env_is_added_to_the_servers_environment(stub):
    r = run(stub, 'echo "$FOO|$BAR|$WIRE_MARKER"; test -n "$PATH"',
            env=["FOO=bar baz", "BAR=x=y"])
    assert r.stdout == b"bar baz|x=y|inherited-from-server\n"
    assert r.code == 0


def test_exec_work_dir_defaults_to_the_data_dir(stub, data):
    r = run(stub, "pwd -P")
    assert r.stdout.decode().strip() == os.path.realpath(data)


def test_exec_work_dir_absolute_and_relative(stub, d):
    rel, ab = d
    r = run(stub, "pwd -P", work_dir="/tmp")
    assert r.stdout == os.path.realpath("/tmp").encode() + b"\n"
    r = run(stub, "pwd -P", work_dir=rel)
    assert r.stdout == os.path.realpath(ab).encode() + b"\n"


def test_exec_large_and_binary_output(stub):
    r = run(stub, "head -c 1000000 /dev/zero; printf '\\377\\001'")
    assert r.stdout == b"\x00" * 1000000 + b"\xff\x01"
    assert r.code == 0


def test_exec_empty_command_is_invalid_argument(stub):
    assert code_of(lambda: list(stub.Exec(iter([pb.ExecInput(command="")]), timeout=10))) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_exec_stream_closed_before_first_message_is_invalid_argument(stub):
    assert code_of(lambda: list(stub.Exec(iter([]), timeout=10))) == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------- startup behaviour


def test_first_start_creates_data_dir_and_copies_template_files(server):
    assert os.path.isdir(server.data_dir)
    for name, content in TEMPLATE_FILES.items():
        assert get(os.path.join(server.data_dir, name)) == content
    # Only regular files of the template dir are copied.
    assert not os.path.exists(os.path.join(server.data_dir, "subdir-not-a-regular-file"))


def test_template_never_overwrites_existing_files(spawn, tmp_path):
    data, template = make_dirs(str(tmp_path))
    os.makedirs(data)
    put(os.path.join(data, "README.md"), b"mine\n")
    srv = spawn(data_dir=data, template_dir=template)
    assert get(os.path.join(data, "README.md")) == b"mine\n"
    assert get(os.path.join(data, "notes.txt")) == TEMPLATE_FILES["notes.txt"]
    srv.stop()
    os.remove(os.path.join(data, "notes.txt"))
    put(os.path.join(data, "README.md"), b"edited\n")
    spawn(data_dir=data, template_dir=template)
    assert get(os.path.join(data, "README.md")) == b"edited\n"
    assert get(os.path.join(data, "notes.txt")) == TEMPLATE_FILES["notes.txt"]


def test_listen_on_unix_socket(spawn, tmp_path):
    data, template = make_dirs(str(tmp_path))
    sock = os.path.join(str(tmp_path), "s.sock")
    srv = spawn(data_dir=data, template_dir=template, listen="unix:" + sock)
    r = srv.stub.Stat(pb.StatRequest(path="."))
    assert r.entry.path == "data"


def test_listen_address_from_mcp_listen_addr(spawn, tmp_path):
    from conftest import free_port

    data, template = make_dirs(str(tmp_path))
    port = free_port()
    srv = spawn(data_dir=data, template_dir=template, listen="127.0.0.1:%d" % port,
                env={"MCP_LISTEN_ADDR": "127.0.0.1:%d" % port},
                args=["--data-dir", data, "--template-dir", template])
    assert srv.stub.Stat(pb.StatRequest(path=".")).entry.is_dir
