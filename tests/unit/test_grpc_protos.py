"""The gRPC protos: buf-style lint rules on the descriptor, released numbers never reused, the
checked-in generated code up to date, and the messages mirroring the REST fields one for one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from ldm_serve.contract import JobKind, JobStatus, ModelConstraints, OutputFormat, Priority, WebhookEventType
from ldm_serve.settings import Settings
from service.grpc_api import codegen, convert
from service.grpc_api.pb import generation_service_pb2 as pb
from service.schemas import build_schemas

FILE = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
PASCAL = re.compile(r"[A-Z][A-Za-z0-9]*")
LOWER_SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")


def _messages() -> list[descriptor_pb2.DescriptorProto]:
    found, stack = [], list(FILE.message_type)
    while stack:
        message = stack.pop()
        found.append(message)
        stack.extend(message.nested_type)
    return found


def test_package_and_file_follow_the_style_guide() -> None:
    assert FILE.package == "ldm_serve.v1" and re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)*\.v[0-9]+", FILE.package)
    directory, name = FILE.name.rsplit("/", 1)
    assert directory == FILE.package.replace(".", "/") and LOWER_SNAKE.fullmatch(name.removesuffix(".proto"))
    assert (codegen.PROTO_ROOT / FILE.name).is_file()
    assert FILE.syntax == "proto3" and not FILE.public_dependency


def test_enums_have_a_zero_unspecified_value_and_prefixed_upper_snake_names() -> None:
    for enum in FILE.enum_type:
        assert PASCAL.fullmatch(enum.name)
        prefix = convert.enum_prefix(pb.DESCRIPTOR.enum_types_by_name[enum.name])
        assert enum.value[0].number == 0 and enum.value[0].name == f"{prefix}UNSPECIFIED", enum.name
        for value in enum.value:
            assert value.name.startswith(prefix) and UPPER_SNAKE.fullmatch(value.name), value.name
        assert len({v.number for v in enum.value}) == len(enum.value), f"{enum.name} reuses a number"


def test_messages_and_fields_are_well_named_with_unique_numbers() -> None:
    for message in _messages():
        assert PASCAL.fullmatch(message.name), message.name
        numbers = [f.number for f in message.field]
        assert len(set(numbers)) == len(numbers), f"{message.name} reuses a field number"
        for field in message.field:
            assert LOWER_SNAKE.fullmatch(field.name), f"{message.name}.{field.name}"
            assert not any(r.start <= field.number < r.end for r in message.reserved_range), field.name
            assert field.name not in message.reserved_name


def test_rpcs_have_their_own_request_and_response_messages() -> None:
    (service,) = FILE.service
    assert service.name.endswith("Service") and PASCAL.fullmatch(service.name)
    used: list[str] = []
    for method in service.method:
        assert PASCAL.fullmatch(method.name)
        assert method.input_type == f".{FILE.package}.{method.name}Request", method.name
        assert method.output_type == f".{FILE.package}.{method.name}Response", method.name
        used += [method.input_type, method.output_type]
    assert len(set(used)) == len(used)


def test_released_numbers_are_never_reused() -> None:
    """Every number in protos/numbers.lock.json still means the same name, or is reserved."""
    lock = json.loads(codegen.LOCK.read_text())
    current = codegen.numbers(descriptor_pb2.FileDescriptorSet(file=[FILE]).SerializeToString())
    for name, entries in current.items():
        missing = set(entries) - set(lock.get(name, {}))
        assert not missing, f"{name}: {sorted(missing)} not in the lock; run python -m service.grpc_api.codegen"
    reserved = {f"{FILE.package}.{m.name}": m for m in FILE.message_type}
    for name, entries in lock.items():
        now = current.get(name, {})
        for entry, number in entries.items():
            if entry in now:
                assert now[entry] == number, f"{name}.{entry} was {number}, is now {now[entry]}"
                continue
            message = reserved.get(name)
            held = message is not None and any(r.start <= number < r.end for r in message.reserved_range)
            assert held, f"{name}.{entry} ({number}) was removed: add `reserved {number};`"
            assert number not in now.values(), f"{name}: number {number} of the removed {entry} is reused"


def test_the_checked_in_code_is_what_protoc_generates(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    written = codegen.generate(tmp_path)
    assert {p.name for p in written} == {p.name for p in codegen.OUT.glob("*_pb2*.py*")}
    for path in written:
        assert path.read_text() == (codegen.OUT / path.name).read_text(), (
            f"{path.name} is stale: run python -m service.grpc_api.codegen"
        )


def test_requests_mirror_the_rest_bodies_field_for_field() -> None:
    schemas = build_schemas(Settings())
    pairs = ((pb.Txt2ImgRequest, schemas.Txt2ImgRequest), (pb.InpaintRequest, schemas.InpaintForm),
             (pb.Img2ImgRequest, schemas.Img2ImgForm))
    for message, schema in pairs:
        fields = {f.name for f in message.DESCRIPTOR.fields} - convert.ENVELOPE_FIELDS
        assert fields == set(schema.model_fields), message.__name__
    assert {"idempotency_key", "image", "mask"} <= {f.name for f in pb.InpaintRequest.DESCRIPTOR.fields}
    assert {f.name for f in pb.ModelConstraints.DESCRIPTOR.fields} == set(ModelConstraints.model_fields)


@pytest.mark.parametrize(
    ("enum", "values"),
    [(pb.JobStatus, JobStatus), (pb.JobKind, JobKind), (pb.Priority, Priority), (pb.OutputFormat, OutputFormat),
     (pb.WebhookEventType, WebhookEventType)],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_every_contract_enum_value_has_its_proto_value(enum: object, values: type) -> None:
    descriptor = enum.DESCRIPTOR  # type: ignore[attr-defined]
    mapped = {convert.enum_text(descriptor, convert.enum_number(descriptor, v.value)) for v in values}
    assert mapped == {v.value for v in values}
    assert len(descriptor.values) == len(values) + 1  # and nothing but them and UNSPECIFIED
