"""grpc.health.v1 and server reflection, as grpcurl and the platforms' probes use them."""

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from conftest import pb

SERVICE = "mcpcontainer.ContainerService"


def test_health_overall_is_serving(server):
    r = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_the_container_service_is_serving(server):
    r = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service_is_not_found(server):
    with pytest.raises(grpc.RpcError) as exc:
        health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def reflect(channel, package, request):
    # v1 and v1alpha are the same messages under two package names.
    call = channel.stream_stream(
        "/%s.ServerReflection/ServerReflectionInfo" % package,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([request]), timeout=5)))


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
def test_reflection_lists_services(server, package):
    r = reflect(server.channel, package, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in r.list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names


def _fields(msg):
    return {f.name: (f.number, f.type, f.label, f.type_name.lstrip(".")) for f in msg.field}


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
def test_reflected_descriptor_matches_the_wire_tables(server, package):
    """The server's own descriptor (as grpcurl sees it) equals the one written from WIRE.md."""
    r = reflect(server.channel, package, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in r.file_descriptor_response.file_descriptor_proto]
    theirs = next(f for f in files if any(s.name == "ContainerService" for s in f.service))
    ours = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(ours)
    assert theirs.package == ours.package == "mcpcontainer"

    def methods(f):
        (svc,) = [s for s in f.service if s.name == "ContainerService"]
        return {m.name: (m.input_type.lstrip("."), m.output_type.lstrip("."),
                         m.client_streaming, m.server_streaming) for m in svc.method}

    assert methods(theirs) == methods(ours)
    their_msgs = {m.name: m for m in theirs.message_type}
    for m in ours.message_type:
        assert m.name in their_msgs, m.name
        # Every field of WIRE.md with the same number, type and label; new fields may exist.
        theirs_f = _fields(their_msgs[m.name])
        for name, spec in _fields(m).items():
            assert theirs_f.get(name) == spec, "%s.%s" % (m.name, name)
    out = their_msgs["ExecOutput"]
    (enum,) = [e for e in out.enum_type if e.name == "Stream"]
    assert {v.name: v.number for v in enum.value} == {"STDOUT": 0, "STDERR": 1, "EXIT": 2}


def test_reflection_lists_only_served_services(server):
    """grpcurl `list` shows what reflection lists; a listed service must be one the server serves."""
    r = reflect(server.channel, "grpc.reflection.v1", reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in r.list_services_response.service}
    # bridgepb.ContainerService is served beside it (test_bridge.py calls every served RPC), and
    # so is memoh.process.v1.ProcessService (test_process.py).
    served = {SERVICE, "bridgepb.ContainerService", "memoh.process.v1.ProcessService", "grpc.health.v1.Health",
              "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    assert names <= served, "listed but not served: %s" % sorted(names - served)
