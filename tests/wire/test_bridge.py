"""bridgepb.ContainerService (WIRE-BRIDGE.md) over a unix socket, with grpcio's DEFAULT channel
options: grpc C-core sends the socket path as :authority, which the server once reset. The
client is generated from proto/bridge.proto; mcpcontainer is checked beside it on the
same server (TCP and the socket)."""

import os

import grpc
import pytest

from conftest import make_dirs, pb, pb_grpc, free_port, bp, bp_grpc



@pytest.fixture(scope="module")
def both(tmp_path_factory, request):
    from conftest import Server
    base = str(tmp_path_factory.mktemp("bridge"))
    data, template = make_dirs(base)
    sock = os.path.join(base, "bridge.sock")
    tcp = "127.0.0.1:%d" % free_port()
    srv = Server(data, template, listen=tcp,
                 args=["--listen", tcp, "--listen", "unix:" + sock,
                       "--data-dir", data, "--template-dir", template])
    # grpcio defaults: no grpc.default_authority.
    ch = grpc.insecure_channel("unix:" + sock)
    grpc.channel_ready_future(ch).result(timeout=20)
    yield srv, bp_grpc.ContainerServiceStub(ch), pb_grpc.ContainerServiceStub(ch), data
    ch.close()
    srv.stop()


def test_every_served_rpc_over_the_unix_socket(both):
    srv, b, _, data = both
    b.WriteFile(bp.WriteFileRequest(path="w/a.txt", content=b"one\ntwo\n"), timeout=10)
    r = b.ReadFile(bp.ReadFileRequest(path="w/a.txt"), timeout=10)
    assert r.total_lines == 2 and "two" in r.content
    st = b.Stat(bp.StatRequest(path="w/a.txt"), timeout=10).entry
    assert (st.path, st.size, st.is_dir) == ("a.txt", 8, False)
    b.Mkdir(bp.MkdirRequest(path="w/sub"), timeout=10)
    ls = b.ListDir(bp.ListDirRequest(path="w", limit=1), timeout=10)
    assert [e.path for e in ls.entries] == ["a.txt"]
    assert (ls.total_count, ls.truncated) == (2, True)
    b.Rename(bp.RenameRequest(old_path="w/a.txt", new_path="w/b.txt"), timeout=10)
    assert os.path.isfile(os.path.join(data, "w", "b.txt"))
    chunks = [bp.WriteRawChunk(path="w/raw.bin", data=b"x" * 70000), bp.WriteRawChunk(data=b"yz")]
    assert b.WriteRaw(iter(chunks), timeout=10).bytes_written == 70002
    got = b"".join(c.data for c in b.ReadRaw(bp.ReadRawRequest(path="w/raw.bin"), timeout=10))
    assert got == b"x" * 70000 + b"yz"
    with pytest.raises(grpc.RpcError) as e:
        b.WriteRaw(iter([bp.WriteRawChunk(path="w/gone.bin", data=b"p"), bp.WriteRawChunk(abort=True)]), timeout=10)
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert not os.path.exists(os.path.join(data, "w", "gone.bin"))
    out = list(b.Exec(iter([bp.ExecInput(command="cat; exit 4", stdin_data=b"hi "),
                            bp.ExecInput(stdin_data=b"there")]), timeout=20))
    stdout = b"".join(m.data for m in out if m.stream == bp.ExecOutput.STDOUT)
    assert stdout == b"hi there"
    assert [m.exit_code for m in out if m.stream == bp.ExecOutput.EXIT] == [4]
    b.DeleteFile(bp.DeleteFileRequest(path="w", recursive=True), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        b.Stat(bp.StatRequest(path="w"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_unimplemented_ones_name_themselves(both):
    _, b, _, _ = both
    with pytest.raises(grpc.RpcError) as e:
        list(b.Terminal(iter([]), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "Terminal" in e.value.details()


def test_mcpcontainer_beside_it(both):
    srv, _, m, _ = both
    # Old clients, old name, old format: on the socket and on TCP.
    m.WriteFile(pb.WriteFileRequest(path="old.txt", content=b"a\n"), timeout=10)
    for stub in (m, srv.stub):
        r = stub.ReadFile(pb.ReadFileRequest(path="old.txt"), timeout=10)
        assert r.content == "     1\ta\n"
