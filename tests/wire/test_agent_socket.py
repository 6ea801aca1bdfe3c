"""The agent's unix socket with grpcio's DEFAULT channel options: grpc C-core sends the socket
path as :authority, which h2 refused until the agent's listener went through the authority fix
(memoh_proto::authority). Both container services and memoh.process.v1.ProcessService are
routed to a bot (bridgepb, mcpcontainer, process), and the agent's own health service answers.

Needs a running agent and a bot: WIRE_AGENT_SOCKET and WIRE_AGENT_BOT (tests/mcp/run.sh sets
them); skipped without them. Every test removes what it made in the bot."""

import os
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import pb, pb_grpc, bp, bp_grpc, ppb, ppb_grpc


SOCKET = os.environ.get("WIRE_AGENT_SOCKET", "")
BOT = os.environ.get("WIRE_AGENT_BOT", "")
CALL = 20


@pytest.fixture(scope="module")
def channel():
    if not (SOCKET and BOT):
        pytest.skip("WIRE_AGENT_SOCKET and WIRE_AGENT_BOT are not set")
    # grpcio defaults: no grpc.default_authority, so :authority is the socket path.
    ch = grpc.insecure_channel("unix:" + SOCKET)
    grpc.channel_ready_future(ch).result(timeout=20)
    yield ch
    ch.close()


MD = (("x-memoh-bot", BOT),)


def test_bridgepb_calls_reach_the_bot(channel):
    b = bp_grpc.ContainerServiceStub(channel)
    d = "agent-socket-%s" % uuid.uuid4().hex[:8]
    b.Mkdir(bp.MkdirRequest(path=d), metadata=MD, timeout=CALL)
    try:
        b.WriteFile(bp.WriteFileRequest(path=d + "/a.txt", content=b"one\ntwo\n"), metadata=MD, timeout=CALL)
        st = b.Stat(bp.StatRequest(path=d + "/a.txt"), metadata=MD, timeout=CALL).entry
        assert (st.size, st.is_dir) == (8, False)
        ls = b.ListDir(bp.ListDirRequest(path=d), metadata=MD, timeout=CALL)
        assert [os.path.basename(e.path) for e in ls.entries] == ["a.txt"]
        assert ls.total_count == 1
        # A streaming call in both directions, through the proxy as it came.
        out = list(b.Exec(iter([bp.ExecInput(command="cat; exit 4", stdin_data=b"hi "),
                                bp.ExecInput(stdin_data=b"there")]), metadata=MD, timeout=CALL))
        assert b"".join(m.data for m in out if m.stream == bp.ExecOutput.STDOUT) == b"hi there"
        assert [m.exit_code for m in out if m.stream == bp.ExecOutput.EXIT] == [4]
    finally:
        b.DeleteFile(bp.DeleteFileRequest(path=d, recursive=True), metadata=MD, timeout=CALL)
    with pytest.raises(grpc.RpcError) as e:
        b.Stat(bp.StatRequest(path=d), metadata=MD, timeout=CALL)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_mcpcontainer_calls_reach_the_bot(channel):
    m = pb_grpc.ContainerServiceStub(channel)
    st = m.Stat(pb.StatRequest(path="/"), metadata=MD, timeout=CALL).entry
    assert st.is_dir


def test_process_service_calls_reach_the_bot(channel):
    """Start, List, Attach (a stream, replayed from an offset), Signal and Wait of the
    process service through the agent, with grpcio as the client."""
    p = ppb_grpc.ProcessServiceStub(channel)
    tag = "agent-socket-%s" % uuid.uuid4().hex[:8]
    r = p.Start(ppb.StartRequest(command="printf 'a\\nbb\\n'; exec sleep 300", tag=tag), metadata=MD, timeout=CALL)
    assert r.id and r.pid > 0
    try:
        listed = p.List(ppb.ListRequest(tag=tag), metadata=MD, timeout=CALL).processes
        assert [x.id for x in listed] == [r.id]
        got = b""
        for _ in range(100):
            out = list(p.Attach(ppb.AttachRequest(id=r.id, stdout_offset=2, no_follow=True), metadata=MD, timeout=CALL))
            got = b"".join(m.data for m in out if m.kind == ppb.AttachOutput.STDOUT)
            assert out[-1].kind == ppb.AttachOutput.END
            if got == b"bb\n":
                break
        assert got == b"bb\n"
        w = p.Wait(ppb.WaitRequest(id=r.id, timeout_ms=50), metadata=MD, timeout=CALL)
        assert not w.exited and w.info.state == ppb.RUNNING
        p.Signal(ppb.SignalRequest(id=r.id, signal=15), metadata=MD, timeout=CALL)
        w = p.Wait(ppb.WaitRequest(id=r.id), metadata=MD, timeout=CALL)
        assert w.exited and w.info.state == ppb.SIGNALED
        assert (w.info.signal, w.info.exit_code) == (15, 143)
    finally:
        # Removes what it made, even after a failure: a kill (refused once it ended), the end.
        try:
            p.Signal(ppb.SignalRequest(id=r.id, signal=9), metadata=MD, timeout=CALL)
        except grpc.RpcError:
            pass
        p.Wait(ppb.WaitRequest(id=r.id), metadata=MD, timeout=CALL)
        p.Remove(ppb.RemoveRequest(id=r.id), metadata=MD, timeout=CALL)
    with pytest.raises(grpc.RpcError) as e:
        p.Wait(ppb.WaitRequest(id=r.id), metadata=MD, timeout=CALL)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_call_without_a_bot_is_refused_with_a_reason(channel):
    b = bp_grpc.ContainerServiceStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        b.Stat(bp.StatRequest(path="/"), timeout=CALL)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-memoh-bot" in e.value.details()


def test_the_agents_health_answers(channel):
    h = health_pb2_grpc.HealthStub(channel)
    r = h.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
