"""The protobuf messages of the atoll deployment protocol, built at import time.

No ``protoc`` step: the schema below is turned into a ``FileDescriptorProto`` and registered in
a private descriptor pool, which yields ordinary protobuf message classes (``SerializeToString``,
``FromString``). Field numbers are the wire contract: only ever add fields, never renumber.

Payloads (broadcasts and updates) are ``transport.wire`` bytes split into ``data`` chunks, so a
model larger than gRPC's per-message limit travels as a stream of small messages.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "atoll.deploy.v1"
SERVICE = f"{PACKAGE}.Coordinator"

# message -> [(field, type)], field numbers in order from 1
SCHEMA: dict[str, list[tuple[str, str]]] = {
    "JoinRequest": [("version", "string")],
    "JoinReply": [("client_id", "int32"), ("name", "string"), ("config_toml", "string"),
                  ("n_features", "int32"), ("n_classes", "int32"), ("num_clients", "int32"),
                  ("max_update_bytes", "int64"), ("chunk_bytes", "int32")],
    # kind: TASK (a task header, then data chunks), SYNC (an anchor for the model the client
    # holds, framed like a task), WAIT (poll again), DONE (training finished). held_*: the round
    # and hash of the model the client holds (per-client downlink; empty hash: none)
    "TaskRequest": [("wait_s", "double"), ("held_round", "int64"), ("held_hash", "string")],
    # STAGE: a secure-aggregation stage's request (stage 1-4, atoll.secure.stagewire), framed like a task
    "TaskChunk": [("kind", "string"), ("round", "int32"), ("task_id", "string"),
                  ("total_bytes", "int64"), ("data", "bytes"), ("stage", "int32")],
    # the first chunk carries the header fields; every chunk carries data. stage > 0: the
    # answer to that secure-aggregation stage, seconds: the client's crypto time in it
    "UpdateChunk": [("round", "int32"), ("task_id", "string"), ("num_examples", "int64"),
                    ("loss", "double"), ("samples", "double"), ("straggler", "bool"),
                    ("data", "bytes"), ("stage", "int32"), ("seconds", "double")],
    "SubmitReply": [("accepted", "bool"), ("reason", "string")],
    "StatusRequest": [],
    "StatusReply": [("phase", "string"), ("round", "int32"), ("rounds", "int32"),
                    ("clients_enrolled", "int32"), ("clients_connected", "int32"),
                    ("sampled", "int32"), ("answered", "int32"), ("last_metrics_json", "string")],
}

_TYPES = {"int32": "TYPE_INT32", "int64": "TYPE_INT64", "double": "TYPE_DOUBLE",
          "bool": "TYPE_BOOL", "string": "TYPE_STRING", "bytes": "TYPE_BYTES"}


def build(package: str, schema: dict[str, list[tuple[str, str]]]) -> dict[str, type]:
    """Message classes of ``schema`` (message -> [(field, type)]) in a private pool."""
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name=package.replace(".", "_") + ".proto",
                                            package=package, syntax="proto3")
    for name, fields in schema.items():
        msg = fd.message_type.add(name=name)
        for number, (field, kind) in enumerate(fields, start=1):
            msg.field.add(name=field, number=number, label=F.LABEL_OPTIONAL,
                          type=getattr(F, _TYPES[kind]))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
            for name in schema}


_CLASSES = build(PACKAGE, SCHEMA)
JoinRequest = _CLASSES["JoinRequest"]
JoinReply = _CLASSES["JoinReply"]
TaskRequest = _CLASSES["TaskRequest"]
TaskChunk = _CLASSES["TaskChunk"]
UpdateChunk = _CLASSES["UpdateChunk"]
SubmitReply = _CLASSES["SubmitReply"]
StatusRequest = _CLASSES["StatusRequest"]
StatusReply = _CLASSES["StatusReply"]

# method -> (request, reply, client streams, server streams)
METHODS = {
    "Join": (JoinRequest, JoinReply, False, False),
    "GetTask": (TaskRequest, TaskChunk, False, True),
    "SubmitUpdate": (UpdateChunk, SubmitReply, True, False),
    "Status": (StatusRequest, StatusReply, False, False),
}
