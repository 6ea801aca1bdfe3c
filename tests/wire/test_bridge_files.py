"""The bridge's file behaviour (WIRE-BRIDGE.md section 3) seen by grpcio over the unix socket:
ReadRawNoFollow and WriteRawNoFollow (a symlink on the path refused, an existing file never
replaced, abort keeping the partial file) and ListDir's collapse. The client is generated from
proto/bridge.proto as in test_bridge.py."""

import os

import grpc
import pytest

from conftest import make_dirs, free_port, bp, bp_grpc



@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from conftest import Server
    base = str(tmp_path_factory.mktemp("bridge_files"))
    data, template = make_dirs(base)
    sock = os.path.join(base, "bridge.sock")
    tcp = "127.0.0.1:%d" % free_port()
    srv = Server(data, template, listen=tcp,
                 args=["--listen", tcp, "--listen", "unix:" + sock,
                       "--data-dir", data, "--template-dir", template])
    ch = grpc.insecure_channel("unix:" + sock)
    grpc.channel_ready_future(ch).result(timeout=20)
    yield bp_grpc.ContainerServiceStub(ch), base, data
    ch.close()
    srv.stop()


def read_nf(b, root, rel):
    req = bp.ReadRawNoFollowRequest(root=root, relative_path=rel)
    return b"".join(c.data for c in b.ReadRawNoFollow(req, timeout=10))


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_no_follow_read_and_write(bridge):
    b, base, data = bridge
    os.makedirs(os.path.join(data, "nf", "dir"))
    with open(os.path.join(data, "nf", "dir", "f"), "wb") as f:
        f.write(b"hello")
    outside = os.path.join(base, "outside")
    os.makedirs(outside)
    with open(os.path.join(outside, "secret"), "wb") as f:
        f.write(b"secret")
    os.symlink("dir", os.path.join(data, "nf", "link_dir"))
    os.symlink(outside, os.path.join(data, "nf", "escape"))
    os.symlink("dir/f", os.path.join(data, "nf", "link_f"))
    root = os.path.join(data, "nf")

    assert read_nf(b, root, "dir/f") == b"hello"
    for rel in ("link_dir/f", "escape/secret", "link_f"):
        code, msg = code_of(lambda: read_nf(b, root, rel))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (rel, msg)
        assert "symlink" in msg, msg
    for rel in ("../outside/secret", "/etc/passwd", "dir//f", ""):
        code, _ = code_of(lambda: read_nf(b, root, rel))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, rel
    code, _ = code_of(lambda: read_nf(b, root, "missing"))
    assert code == grpc.StatusCode.NOT_FOUND

    chunks = [bp.WriteRawNoFollowChunk(root=root, relative_path="new/sub/f.bin", data=b"x" * 70000),
              bp.WriteRawNoFollowChunk(data=b"yz")]
    assert b.WriteRawNoFollow(iter(chunks), timeout=10).bytes_written == 70002
    p = os.path.join(root, "new", "sub", "f.bin")
    with open(p, "rb") as f:
        assert f.read() == b"x" * 70000 + b"yz"
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert os.stat(os.path.join(root, "new")).st_mode & 0o777 == 0o750

    code, _ = code_of(lambda: b.WriteRawNoFollow(iter([bp.WriteRawNoFollowChunk(
        root=root, relative_path="link_dir/evil", data=b"e")]), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert not os.path.exists(os.path.join(root, "dir", "evil"))
    for rel in ("dir/f", "link_f"):
        code, _ = code_of(lambda: b.WriteRawNoFollow(iter([bp.WriteRawNoFollowChunk(
            root=root, relative_path=rel, data=b"e")]), timeout=10))
        assert code == grpc.StatusCode.ALREADY_EXISTS, rel
    with open(os.path.join(root, "dir", "f"), "rb") as f:
        assert f.read() == b"hello"

    code, _ = code_of(lambda: b.WriteRawNoFollow(iter([
        bp.WriteRawNoFollowChunk(root=root, relative_path="partial", data=b"kept"),
        bp.WriteRawNoFollowChunk(abort=True)]), timeout=10))
    assert code == grpc.StatusCode.ABORTED
    with open(os.path.join(root, "partial"), "rb") as f:
        assert f.read() == b"kept"


def test_list_dir_collapse(bridge):
    b, _, data = bridge
    for i in range(12):
        d = os.path.join(data, "tree", "big")
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "f%02d" % i), "wb").close()
    os.makedirs(os.path.join(data, "tree", "small"))
    open(os.path.join(data, "tree", "small", "one"), "wb").close()
    open(os.path.join(data, "tree", "big.txt"), "wb").close()
    r = b.ListDir(bp.ListDirRequest(path="tree", recursive=True, collapse_threshold=10), timeout=10)
    got = [(e.path, e.is_dir, e.summary) for e in r.entries]
    assert got == [
        ("big", True, ""),
        ("big.txt", False, ""),
        ("big/", True, "12 items (not expanded)"),
        ("small", True, ""),
        ("small/one", False, ""),
    ]
    assert (r.total_count, r.truncated) == (5, False)
    r = b.ListDir(bp.ListDirRequest(path="tree", recursive=True, collapse_threshold=10,
                                    offset=2, limit=2), timeout=10)
    assert [e.path for e in r.entries] == ["big/", "small"]
    assert (r.total_count, r.truncated) == (5, True)
    code, msg = code_of(lambda: b.ListDir(bp.ListDirRequest(
        path="tree", recursive=True, collapse_threshold=10, max_entries=15), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_entries" in msg
