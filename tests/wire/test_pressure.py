"""The server at its process limit, seen by an independent client (grpcio).

A server of its own is moved into a fresh pids cgroup whose pids.max is then set to what the
server already holds, so not one more thread or process can be made: calls that start no
process (Stat, ReadFile, WriteRaw) must keep working, and an Exec must answer
RESOURCE_EXHAUSTED with a clear message instead of a reset stream or a bare errno. The limit
is set only after the ten seconds in which a blocking thread made on demand would have exited:
what answers was there at boot. Needs root and a writable pids cgroup (v1 or v2);
skipped otherwise. The cgroup is removed at the end, also on failure.
"""

import os
import time
import uuid

import grpc
import pytest

from conftest import Server, make_dirs, pb, wait_for

AT_PIDS_LIMIT = "cannot start a process: the bot is at its process limit"


def _pids_root():
    v1 = "/sys/fs/cgroup/pids"
    if os.path.isfile(os.path.join(v1, "cgroup.procs")):
        return v1
    v2 = "/sys/fs/cgroup"
    try:
        with open(os.path.join(v2, "cgroup.subtree_control")) as f:
            if "pids" in f.read().split():
                return v2
    except OSError:
        pass
    return None


@pytest.fixture
def pids_cgroup():
    root = _pids_root()
    if os.geteuid() != 0 or root is None:
        pytest.skip("needs root and a pids cgroup")
    path = os.path.join(root, "wire-pressure-" + uuid.uuid4().hex[:8])
    try:
        os.mkdir(path)
    except OSError as e:
        pytest.skip("cannot make a pids cgroup: %s" % e)
    yield path
    # Lift the limit, move whatever is left out, then remove the cgroup.
    try:
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write("max")
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = f.read().split()
        for pid in pids:
            try:
                with open(os.path.join(root, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except OSError:
                pass
    finally:
        wait_for(lambda: _try_rmdir(path), timeout=10)


def _try_rmdir(path):
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _write(path, value):
    with open(path, "w") as f:
        f.write(value)


def _read(path):
    with open(path) as f:
        return f.read().strip()


def test_at_its_process_limit_the_server_answers_and_exec_is_resource_exhausted(tmp_path, pids_cgroup):
    data, template = make_dirs(str(tmp_path))
    srv = Server(data, template)
    try:
        stub = srv.stub
        stub.WriteFile(pb.WriteFileRequest(path="p.txt", content=b"one\ntwo\n"), timeout=10)
        _write(os.path.join(pids_cgroup, "cgroup.procs"), str(srv.proc.pid))
        # Threads made on demand and left idle would be gone by now; then not one more.
        time.sleep(11)
        held = int(_read(os.path.join(pids_cgroup, "pids.current")))
        _write(os.path.join(pids_cgroup, "pids.max"), str(held))

        entry = stub.Stat(pb.StatRequest(path="p.txt"), timeout=10).entry
        assert entry.size == 8
        r = stub.ReadFile(pb.ReadFileRequest(path="p.txt"), timeout=10)
        assert "two" in r.content
        big = os.urandom(1 << 20)
        chunks = [pb.WriteRawChunk(path="big.bin")] + [
            pb.WriteRawChunk(data=big[i:i + 65536]) for i in range(0, len(big), 65536)
        ]
        assert stub.WriteRaw(iter(chunks), timeout=20).bytes_written == len(big)
        with open(os.path.join(data, "big.bin"), "rb") as f:
            assert f.read() == big

        with pytest.raises(grpc.RpcError) as e:
            list(stub.Exec(iter([pb.ExecInput(command="true")]), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
        assert e.value.details() == AT_PIDS_LIMIT

        # The limit lifted, the same server runs commands again.
        _write(os.path.join(pids_cgroup, "pids.max"), "max")
        out = list(stub.Exec(iter([pb.ExecInput(command="echo again")]), timeout=10))
        assert b"".join(m.data for m in out if m.stream == pb.ExecOutput.STDOUT) == b"again\n"
        assert out[-1].stream == pb.ExecOutput.EXIT and out[-1].exit_code == 0
        assert srv.proc.poll() is None
    finally:
        srv.stop()
