"""memoh.process.v1.ProcessService from grpcio (stubs generated from proto/process.proto),
against the session's server on its loopback port: Start, Attach replaying exact bytes with
their offsets, a cancelled Attach (grpcio cancels with RST_STREAM, unlike tonic's drop)
leaving the process running and a re-attach resuming exactly, Wait, Signal to the group,
and the bridge Exec's EXIT carrying resource_usage."""

import time

import grpc
import pytest

from conftest import ppb, ppb_grpc, bp, bp_grpc


@pytest.fixture
def procs(server):
    return ppb_grpc.ProcessServiceStub(server.channel)


def test_health_and_reflection_show_the_process_service(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from test_health_reflection import reflect
    from grpc_reflection.v1alpha import reflection_pb2
    r = health_pb2_grpc.HealthStub(server.channel).Check(
        health_pb2.HealthCheckRequest(service="memoh.process.v1.ProcessService"), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    r = reflect(server.channel, "grpc.reflection.v1", reflection_pb2.ServerReflectionRequest(list_services=""))
    assert "memoh.process.v1.ProcessService" in {s.name for s in r.list_services_response.service}


def counter(n):
    return b"".join(b"%06d\n" % i for i in range(n))


def counter_cmd(n, pause):
    return ("i=0; while [ $i -lt %d ]; do printf '%%06d\\n' $i; i=$((i+1)); "
            "if [ $((i %% 100)) -eq 0 ]; then sleep %s; fi; done" % (n, pause))


def collect(responses, out, next_off):
    """Reads an Attach to its end; checks offsets chunk by chunk. Returns the last message."""
    last = None
    for m in responses:
        if m.kind == ppb.AttachOutput.STDOUT:
            assert m.offset == next_off[0], "gap or duplicate at %d (want %d)" % (m.offset, next_off[0])
            out += m.data
            next_off[0] += len(m.data)
        elif m.kind == ppb.AttachOutput.STDERR:
            assert m.offset == next_off[1]
            next_off[1] += len(m.data)
        elif m.kind == ppb.AttachOutput.LOST:
            pytest.fail("unexpected LOST: %s" % m)
        else:
            assert last is None, "a message after EXIT / END"
            last = m
    return last


def test_start_attach_replays_exact_bytes_and_wait(procs):
    n = 2000
    r = procs.Start(ppb.StartRequest(command="printf '%06d\\n' $(seq 0 1999); echo err >&2; exit 5",
                                     tag="wire"), timeout=10)
    assert len(r.id) == 12 and r.pid > 0
    w = procs.Wait(ppb.WaitRequest(id=r.id, timeout_ms=30000), timeout=40)
    assert w.exited
    assert w.info.state == ppb.EXITED and w.info.exit_code == 5
    assert w.info.usage.max_rss_bytes > 0
    assert w.info.stdout_bytes == len(counter(n)) and w.info.stderr_bytes == 4
    for start in (0, 1, 7001, len(counter(n))):
        out, nxt = bytearray(), [start, 0]
        last = collect(procs.Attach(ppb.AttachRequest(id=r.id, stdout_offset=start), timeout=30), out, nxt)
        assert bytes(out) == counter(n)[start:]
        assert last.kind == ppb.AttachOutput.EXIT and last.info.exit_code == 5
    listed = procs.List(ppb.ListRequest(tag="wire"), timeout=10).processes
    assert [p.id for p in listed] == [r.id]
    with pytest.raises(grpc.RpcError) as e:
        procs.Wait(ppb.WaitRequest(id="0123456789ab"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        procs.Attach(ppb.AttachRequest(id="../x"), timeout=10).next()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    procs.Remove(ppb.RemoveRequest(id=r.id), timeout=10)


def test_a_cancelled_attach_leaves_the_process_running_and_a_reattach_resumes(procs):
    n = 3000
    r = procs.Start(ppb.StartRequest(command=counter_cmd(n, "0.05")), timeout=10)
    call = procs.Attach(ppb.AttachRequest(id=r.id))
    out, nxt = bytearray(), [0, 0]
    for m in call:
        assert m.kind == ppb.AttachOutput.STDOUT
        assert m.offset == nxt[0]
        out += m.data
        nxt[0] += len(m.data)
        if len(out) >= 3000:
            break
    call.cancel()
    time.sleep(0.3)
    info = [p for p in procs.List(ppb.ListRequest(), timeout=10).processes if p.id == r.id][0]
    assert info.state == ppb.RUNNING, "the cancel must not end the process"
    last = collect(procs.Attach(ppb.AttachRequest(id=r.id, stdout_offset=nxt[0]), timeout=60), out, nxt)
    assert bytes(out) == counter(n)
    assert last.kind == ppb.AttachOutput.EXIT and last.info.exit_code == 0


def test_signal_ends_the_group_and_wait_reports_it(procs):
    r = procs.Start(ppb.StartRequest(command="sleep 300 & echo up; wait"), timeout=10)
    out, nxt = bytearray(), [0, 0]
    call = procs.Attach(ppb.AttachRequest(id=r.id))
    for m in call:
        out += m.data
        nxt[0] += len(m.data)
        if b"up" in out:
            break
    call.cancel()
    w = procs.Wait(ppb.WaitRequest(id=r.id, timeout_ms=100), timeout=10)
    assert not w.exited and w.info.state == ppb.RUNNING
    with pytest.raises(grpc.RpcError) as e:
        procs.Signal(ppb.SignalRequest(id=r.id, signal=0), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    procs.Signal(ppb.SignalRequest(id=r.id, signal=15), timeout=10)
    w = procs.Wait(ppb.WaitRequest(id=r.id, timeout_ms=10000), timeout=20)
    assert w.exited
    assert w.info.state == ppb.SIGNALED and w.info.signal == 15 and w.info.exit_code == 143


def test_the_live_limit_is_resource_exhausted(spawn, tmp_path):
    from conftest import make_dirs
    data, template = make_dirs(str(tmp_path))
    srv = spawn(data_dir=data, template_dir=template, env={"MEMOH_PROCESS_MAX_LIVE": "1"})
    stub = ppb_grpc.ProcessServiceStub(srv.channel)
    first = stub.Start(ppb.StartRequest(command="sleep 300"), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        stub.Start(ppb.StartRequest(command="true"), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many live processes (1)" in e.value.details()
    stub.Signal(ppb.SignalRequest(id=first.id, signal=9), timeout=10)
    assert stub.Wait(ppb.WaitRequest(id=first.id, timeout_ms=10000), timeout=20).exited


def test_bridge_exec_exit_carries_resource_usage(server):
    stub = bp_grpc.ContainerServiceStub(server.channel)
    first = bp.ExecInput(command="dd if=/dev/zero of=/dev/null bs=32M count=1 2>/dev/null; exit 2")
    exits = [m for m in stub.Exec(iter([first]), timeout=30) if m.stream == bp.ExecOutput.EXIT]
    assert len(exits) == 1
    assert exits[0].exit_code == 2
    assert exits[0].HasField("resource_usage")
    assert exits[0].resource_usage.max_rss_bytes >= 32 << 20
