"""Message classes of the protos an older KFP backend is built with, for parsing an IR as it does.

The .proto files of that backend (vendored under kfp_backend_<version>/, verbatim) say which
messages and fields it knows; today's descriptors (kfp-pipeline-spec, kfp-kubernetes, already
in the venv) pruned to those fields give message classes that protobuf's own JSON parser then
uses strictly (what the backend's `protojson.Unmarshal` / `jsonpb.UnmarshalString` do) or
dropping unknown fields (what `jsonpb.Unmarshaler{AllowUnknownFields: true}` does). Pruning
instead of compiling the old files needs no protoc.
"""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory, struct_pb2
from google.rpc import status_pb2
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

HERE = Path(__file__).resolve().parent
TOKENS = re.compile(r"(?P<open>\b(?P<kind>message|enum|oneof|service)\s+(?P<name>\w+)\s*\{)|(?P<close>\})|"
                    r"(?P<field>(?:\brepeated\s+|\boptional\s+)?(?:map<[^>]+>|[\w.]+)\s+(?P<field_name>\w+)\s*=\s*\d+)")


def declared(proto: str) -> dict[str, set[str]]:
    """Each message of a .proto text (dotted name within its package) -> the names of its fields."""
    text = re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", proto), flags=re.S)
    text = re.sub(r'"[^"]*"', '""', text)  # strings hold no declarations
    stack: list[tuple[str, str]] = []
    fields: dict[str, set[str]] = {}
    for match in TOKENS.finditer(text):
        if match["open"]:
            stack.append((match["kind"], match["name"]))
            if match["kind"] == "message":
                fields.setdefault(".".join(n for k, n in stack if k == "message"), set())
        elif match["close"]:
            stack.pop()
        elif stack and stack[-1][0] in ("message", "oneof"):
            fields[".".join(n for k, n in stack if k == "message")].add(match["field_name"])
    return fields


def prune(file: descriptor_pb2.FileDescriptorProto, known: dict[str, set[str]]) -> None:
    """Drop every field that the old .proto does not declare (whole messages it lacks stay,
    unreachable: no declared field refers to them)."""
    def visit(messages, prefix: str) -> None:
        for message in messages:
            name = prefix + message.name
            if name in known:
                keep = [f for f in message.field if f.name in known[name]]
                del message.field[:]
                message.field.extend(keep)
                used = {f.oneof_index for f in keep if f.HasField("oneof_index")}
                if len(used) != len(message.oneof_decl):  # renumber the oneofs that still have fields
                    order = sorted(used)
                    for f in message.field:
                        if f.HasField("oneof_index"):
                            f.oneof_index = order.index(f.oneof_index)
                    decls = [message.oneof_decl[i] for i in order]
                    del message.oneof_decl[:]
                    message.oneof_decl.extend(decls)
            visit(message.nested_type, name + ".")
    visit(file.message_type, "")


def backend_messages(backend: str = "2.2.0"):
    """(PipelineSpec, PlatformSpec, PipelineContainerSpec, KubernetesExecutorConfig) as `backend` knows them."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(descriptor) -> None:  # google's well-known protos, dependencies first
        for dependency in descriptor.dependencies:
            add(dependency)
        if descriptor.name not in added and descriptor.name.startswith("google/"):
            file = descriptor_pb2.FileDescriptorProto()
            descriptor.CopyToProto(file)
            pool.Add(file)
            added.add(descriptor.name)

    for module in (struct_pb2, duration_pb2, status_pb2):
        add(module.DESCRIPTOR)
    for module, proto in ((pipeline_spec_pb2, "pipeline_spec.proto"),
                          (kubernetes_executor_config_pb2, "kubernetes_executor_config.proto")):
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        prune(file, declared((HERE / f"kfp_backend_{backend}" / proto).read_text()))
        pool.Add(file)
    get = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))  # noqa: E731
    return (get("ml_pipelines.PipelineSpec"), get("ml_pipelines.PlatformSpec"),
            get("ml_pipelines.PipelineDeploymentConfig.PipelineContainerSpec"),
            get("kfp_kubernetes.KubernetesExecutorConfig"))
