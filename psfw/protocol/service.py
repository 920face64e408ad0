"""The gRPC service's name and the channel options both ends use."""

from __future__ import annotations

from psfw.proto import ps_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
MAX_MESSAGE_BYTES = 4 << 20  # chunks are about 1 MiB: 4 MiB leaves room, bounds abuse
REASON_KEY = "psfw-reason"  # trailing metadata: the reason code of a refusal (psfw.protocol.errors.Reason)


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
