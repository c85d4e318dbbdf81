"""The Open Inference Protocol (KServe v2) over gRPC: the ``inference.GRPCInferenceService`` of KServe
and Triton, on ``--grpc-port`` beside the HTTP port, in the same process and event loop.

The service's messages are described here, in code (:func:`messages`), rather than compiled from
KServe's ``grpc_predict_v2.proto`` with ``protoc``: the same names, field numbers and types (the wire
format), in a descriptor pool of their own, so the server needs no generated code and no protocol
compiler, and a Triton or KServe client in the same process keeps its own definitions.

Served: ``ServerLive``, ``ServerReady``, ``ModelReady``, ``ServerMetadata``, ``ModelMetadata``,
``ModelConfig`` (Triton's, the fields of :func:`levit.runtime.serve_kserve.model_config`; what
``perf_analyzer`` reads first) and ``ModelInfer``, whose request and answer are those of the HTTP route
(:mod:`levit.runtime.serve_kserve`): one ``BYTES`` input of encoded images, in ``raw_input_contents``
(each element a 4-byte little-endian length then the bytes, as ``tritonclient.grpc`` sends them) or
in ``contents.bytes_contents``; outputs ``class``, ``label``, ``prob`` in ``raw_output_contents``.
Refusals are gRPC status codes (:data:`STATUS`) with the message the HTTP route would give.
``ModelStreamInfer`` (Triton's streaming extension) answers each ``ModelInferRequest`` sent on a
stream with a ``ModelStreamInferResponse``: the answer, or the refusal's message in ``error_message``.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any

from .serve_http import ClientError
from .serve_kserve import OUTPUTS, V2Request, bytes_elements, encode_tensor, model_config

if TYPE_CHECKING:
    from .serve_app import LeViTService

__all__ = ["SERVICE", "STATUS", "messages", "start_grpc"]

log = logging.getLogger("levit.serve")

SERVICE = "inference.GRPCInferenceService"
# HTTP status of a refusal -> the gRPC status code's name
STATUS = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

# field: (name, number, type, repeated, message type); the types are FieldDescriptorProto's names
_PARAMS = ("parameters", 4, "map:InferParameter")
_TENSOR = [("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "int64*")]
_MESSAGES: dict[str, list[tuple]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool")],
    "ModelReadyRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelReadyResponse": [("ready", 1, "bool")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string"), ("version", 2, "string"), ("extensions", 3, "string*")],
    "ModelMetadataRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelMetadataResponse.TensorMetadata": _TENSOR,
    "ModelMetadataResponse": [
        ("name", 1, "string"),
        ("versions", 2, "string*"),
        ("platform", 3, "string"),
        ("inputs", 4, "ModelMetadataResponse.TensorMetadata*"),
        ("outputs", 5, "ModelMetadataResponse.TensorMetadata*"),
    ],
    # Triton's model configuration (its model_config.proto), the fields levit fills in; an enum is an
    # int32 on the wire, so DataType is declared as one (TYPE_STRING = 13, ... : _DATA_TYPES)
    "ModelConfigRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelConfigResponse": [("config", 1, "ModelConfig")],
    "ModelInput": [("name", 1, "string"), ("data_type", 2, "int32"), ("dims", 4, "int64*")],
    "ModelOutput": [("name", 1, "string"), ("data_type", 2, "int32"), ("dims", 3, "int64*")],
    "ModelDynamicBatching": [("preferred_batch_size", 1, "int32*"), ("max_queue_delay_microseconds", 2, "uint64")],
    "ModelConfig": [
        ("name", 1, "string"),
        ("platform", 2, "string"),
        ("max_batch_size", 4, "int32"),
        ("input", 5, "ModelInput*"),
        ("output", 6, "ModelOutput*"),
        ("dynamic_batching", 11, "ModelDynamicBatching"),
        ("backend", 17, "string"),
    ],
    "InferParameter": [
        ("bool_param", 1, "bool?"),
        ("int64_param", 2, "int64?"),
        ("string_param", 3, "string?"),
        ("double_param", 4, "double?"),
        ("uint64_param", 5, "uint64?"),
    ],
    "InferTensorContents": [
        ("bool_contents", 1, "bool*"),
        ("int_contents", 2, "int32*"),
        ("int64_contents", 3, "int64*"),
        ("uint_contents", 4, "uint32*"),
        ("uint64_contents", 5, "uint64*"),
        ("fp32_contents", 6, "float*"),
        ("fp64_contents", 7, "double*"),
        ("bytes_contents", 8, "bytes*"),
    ],
    "ModelInferRequest.InferInputTensor": [*_TENSOR, _PARAMS, ("contents", 5, "InferTensorContents")],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, "string"), ("parameters", 2, "map:InferParameter")],
    "ModelInferRequest": [
        ("model_name", 1, "string"),
        ("model_version", 2, "string"),
        ("id", 3, "string"),
        _PARAMS,
        ("inputs", 5, "ModelInferRequest.InferInputTensor*"),
        ("outputs", 6, "ModelInferRequest.InferRequestedOutputTensor*"),
        ("raw_input_contents", 7, "bytes*"),
    ],
    "ModelInferResponse.InferOutputTensor": [*_TENSOR, _PARAMS, ("contents", 5, "InferTensorContents")],
    "ModelInferResponse": [
        ("model_name", 1, "string"),
        ("model_version", 2, "string"),
        ("id", 3, "string"),
        _PARAMS,
        ("outputs", 5, "ModelInferResponse.InferOutputTensor*"),
        ("raw_output_contents", 6, "bytes*"),
    ],
    # Triton's streaming extension: one answer per request on the stream, or the refusal's message
    "ModelStreamInferResponse": [("error_message", 1, "string"), ("infer_response", 2, "ModelInferResponse")],
}
_RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelInfer")
_STREAM = "ModelStreamInfer"  # stream ModelInferRequest -> stream ModelStreamInferResponse
_DATA_TYPES = {"TYPE_INT64": 9, "TYPE_FP32": 11, "TYPE_STRING": 13}  # Triton's DataType enum


def _add_field(msg: Any, path: str, name: str, number: int, kind: str) -> None:
    """One field of ``msg`` (a DescriptorProto whose full name in the package is ``path``): ``kind`` is
    a scalar type or a message name, ``*`` repeated, ``?`` in the message's one ``oneof``, ``map:V`` a
    map from string to the message ``V``."""
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FieldDescriptorProto
    f = msg.field.add(name=name, number=number, label=fd.LABEL_OPTIONAL)
    if kind.endswith("*"):
        f.label, kind = fd.LABEL_REPEATED, kind[:-1]
    if kind.endswith("?"):
        if not msg.oneof_decl:
            msg.oneof_decl.add(name="parameter_choice")
        f.oneof_index, kind = 0, kind[:-1]
    if kind.startswith("map:"):  # a nested ParametersEntry {key = 1; value = 2}, as protoc writes a map
        entry = msg.nested_type.add(name="ParametersEntry")
        entry.options.map_entry = True
        _add_field(entry, path + ".ParametersEntry", "key", 1, "string")
        _add_field(entry, path + ".ParametersEntry", "value", 2, kind[4:])
        f.label, kind = fd.LABEL_REPEATED, path + ".ParametersEntry"
    scalar = getattr(fd, "TYPE_" + kind.upper(), None)
    if scalar is not None and "." not in kind:
        f.type = scalar
    else:
        f.type, f.type_name = fd.TYPE_MESSAGE, ".inference." + kind


@functools.cache
def messages() -> dict[str, type]:
    """The service's message classes by name (``"ModelInferRequest"``, ``"ModelInferRequest.InferInputTensor"``,
    ...), in a descriptor pool of their own."""
    from google.protobuf import descriptor_pool, message_factory
    from google.protobuf.descriptor_pb2 import FileDescriptorProto

    proto = FileDescriptorProto(name="levit/kserve_v2.proto", package="inference", syntax="proto3")
    made: dict[str, Any] = {}
    for path in sorted(_MESSAGES, key=lambda p: p.count(".")):  # outer messages before nested ones
        outer, _, inner = path.rpartition(".")
        made[path] = made[outer].nested_type.add(name=inner) if outer else proto.message_type.add(name=inner)
    for path, fields in _MESSAGES.items():
        for name, number, kind in fields:
            _add_field(made[path], path, name, number, kind)
    service = proto.service.add(name=SERVICE.split(".")[1])
    for rpc in _RPCS:
        service.method.add(name=rpc, input_type=f".inference.{rpc}Request", output_type=f".inference.{rpc}Response")
    service.method.add(
        name=_STREAM,
        input_type=".inference.ModelInferRequest",
        output_type=".inference.ModelStreamInferResponse",
        client_streaming=True,
        server_streaming=True,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        path: message_factory.GetMessageClass(pool.FindMessageTypeByName("inference." + path)) for path in _MESSAGES
    }


def _parse(request: Any) -> V2Request:
    """The :class:`V2Request` in a ``ModelInferRequest``; :class:`ClientError` 400 otherwise (the model
    and its version are :meth:`levit.runtime.serve_app.LeViTService.infer_images`'s to check)."""
    import math

    if len(request.inputs) != 1 or request.inputs[0].datatype != "BYTES":
        raise ClientError(400, "expected one input: the encoded images, datatype BYTES, shape [N] or [N, 1]")
    count = math.prod(request.inputs[0].shape)
    if request.raw_input_contents:
        images = bytes_elements(request.raw_input_contents[0], count)
    else:
        images = list(request.inputs[0].contents.bytes_contents)
        if len(images) != count:
            raise ClientError(400, f"{len(images)} BYTES elements for a shape of {count}")
    if not images:
        raise ClientError(400, "no image in the request (input shape [0])")
    unknown = [o.name for o in request.outputs if o.name not in OUTPUTS]
    if unknown:
        raise ClientError(400, f"unknown output {unknown[0]!r}: the outputs are {', '.join(OUTPUTS)}")
    params = request.parameters
    return V2Request(
        images=images,
        topk=params["topk"].int64_param if "topk" in params else None,
        id=request.id or None,
        timeout_s=params["timeout"].int64_param / 1e6 if "timeout" in params else None,
        outputs=dict.fromkeys([o.name for o in request.outputs] or OUTPUTS, True),
    )


class _Servicer:
    """The RPCs, answered by ``service``."""

    def __init__(self, service: LeViTService) -> None:
        self.service = service
        self.m = messages()

    def _ready(self) -> bool:
        return self.service.ready and not self.service.draining

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (the RPC's name)
        return self.m["ServerLiveResponse"](live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self.m["ServerReadyResponse"](ready=self._ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        entry = self.service.entries.get(request.name)
        ok = entry is not None and request.version in ("", entry.serving.label)
        return self.m["ModelReadyResponse"](ready=ok and self._ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        from .._version import __version__

        return self.m["ServerMetadataResponse"](name="levit", version=__version__, extensions=[])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            entry = self.service.entry_for(request.name)
        except ClientError as e:
            await _abort(context, e)
        tensor = self.m["ModelMetadataResponse.TensorMetadata"]
        return self.m["ModelMetadataResponse"](
            name=entry.name,
            versions=[entry.serving.label],
            platform="levit",
            inputs=[tensor(name="image", datatype="BYTES", shape=[-1, 1])],
            outputs=[tensor(name=n, datatype=t, shape=[-1, -1]) for n, t in OUTPUTS.items()],
        )

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            entry = self.service.entry_for(request.name)
        except ClientError as e:
            await _abort(context, e)
        config = model_config(self.service, entry.name)
        for tensor in (*config["input"], *config["output"]):
            tensor["data_type"] = _DATA_TYPES[tensor["data_type"]]
        return self.m["ModelConfigResponse"](config=config)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            return await self._infer(request, context.time_remaining())
        except ClientError as e:
            await _abort(context, e)

    async def ModelStreamInfer(self, requests: Any, context: Any) -> None:  # noqa: N802
        """Triton's streaming extension: each request on the stream is answered on it as soon as its
        images are classified, in the order they finish (a client matches answers by ``id``); a
        refusal is an answer whose ``error_message`` is the HTTP route's, and the stream goes on.
        Requests are batched with every other client's, under the same queue bound; a request's
        deadline is its ``timeout`` parameter (the stream's own deadline ends the stream)."""
        import asyncio

        writing, pending = asyncio.Lock(), set()
        # a stream's unanswered requests are bounded as the queue is: past the bound the stream is not
        # read, and gRPC's flow control holds the client back; unbounded, a client that sends without
        # reading its answers would pile its requests up in the server's memory
        room = asyncio.Semaphore(self.service.max_queue)

        async def answer(request: Any) -> None:
            try:
                reply = self.m["ModelStreamInferResponse"](infer_response=await self._infer(request, None))
            except Exception as e:  # a refusal or a fault is this request's answer, not the stream's end
                message = str(e)
                if not isinstance(e, ClientError):  # its details go to the log, not to the client
                    log.exception("ModelStreamInfer: request %r failed", request.id)
                    message = "internal error (the server's log has the details)"
                head = self.m["ModelInferResponse"](model_name=request.model_name, id=request.id)
                reply = self.m["ModelStreamInferResponse"](error_message=message, infer_response=head)
            try:
                # one write at a time on a stream: a second one while the first is in flight stalls it
                async with writing:
                    await context.write(reply)
            finally:
                room.release()

        stream = aiter(requests)
        try:
            while True:
                await room.acquire()  # room for its answer before a request is read
                try:
                    request = await anext(stream)
                except StopAsyncIteration:
                    break
                task = asyncio.ensure_future(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)  # the client has sent all: its last answers, then the stream ends
        finally:  # the client went away: nothing more is computed for it
            for task in pending:
                task.cancel()

    async def _infer(self, request: Any, time_remaining: float | None) -> Any:
        """The ``ModelInferResponse`` to ``request`` within the sooner of its ``timeout`` parameter
        and ``time_remaining`` (s); :class:`ClientError` for a refusal."""
        s = self.service
        req = _parse(request)
        topk = req.topk if req.topk is not None else s.config.topk
        timeouts = [t for t in (req.timeout_s, time_remaining) if t is not None]
        deadline = min(timeouts) if timeouts else None
        label = request.model_version or None
        rows, version = await s.infer_images(req.images, topk, deadline, model=request.model_name, label=label)
        answer = self.m["ModelInferResponse"](model_name=request.model_name, model_version=version, id=req.id or "")
        for name in req.outputs:
            head, raw = encode_tensor(name, rows, True)
            answer.outputs.add(name=name, datatype=head["datatype"], shape=head["shape"])
            answer.raw_output_contents.append(raw)
        return answer


async def _abort(context: Any, error: ClientError) -> None:
    import grpc

    await context.abort(getattr(grpc.StatusCode, STATUS.get(error.status, "INTERNAL")), str(error))


async def start_grpc(service: LeViTService, host: str, port: int) -> tuple[Any, int]:
    """Serve the KServe v2 gRPC service for ``service`` on ``host:port`` (0: a free port) on the running
    event loop; returns the started ``grpc.aio`` server and its port; ``RuntimeError`` when the
    port cannot be bound."""
    # gRPC's C core logs a line at INFO whenever a thread forks while it runs (each decoding process
    # the server starts): its verbosity is ERROR unless the user set it. Read when grpc is imported.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import grpc

    m, servicer = messages(), _Servicer(service)
    limit = int(service.config.max_body_mb * 2**20) + 2**16  # the images, and the request around them
    handlers = {
        rpc: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, rpc),
            request_deserializer=m[rpc + "Request"].FromString,
            response_serializer=m[rpc + "Response"].SerializeToString,
        )
        for rpc in _RPCS
    }
    handlers[_STREAM] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=m["ModelInferRequest"].FromString,
        response_serializer=m["ModelStreamInferResponse"].SerializeToString,
    )
    # the port is this server's alone, as the HTTP port is: gRPC's default (SO_REUSEPORT) would let a
    # second server bind it too, and the kernel would then split the clients between the two
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    server = grpc.aio.server(options=[*options, ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    try:
        bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except RuntimeError:  # gRPC's own wording ("Failed to bind ..."): said as for the HTTP port
        raise RuntimeError(f"cannot listen on {host}:{port}") from None
    await server.start()
    log.warning("KServe v2 gRPC on %s:%d", host, bound)
    return server, bound
