#!/usr/bin/env python3
"""An external taskfactory executor in Python: it serves the task type `uppercase`.

    scripts/tools.sh python      # pinned nats-py and protobuf into .tools/python
    PYTHONPATH=.tools/python python3 examples/python-executor/executor.py

`uppercase` takes params `{"text": "..."}` and succeeds with the output `{"text": "..."}` in upper
case. A task without a string `text` fails permanently (DEAD at once, copied to
`dlq.tasks.uppercase`). Two optional params are there to watch the machinery: `failAttempts: N`
fails the first N attempts with a transient error (retried with backoff), `sleepSeconds: S` works
for S seconds (the message is kept alive with progress acks meanwhile).

The contract it implements is the README's "Writing an external executor"; in short, per task
message on `tasks.<type>` (stream FACTORY_TASKS, durable pull consumer `python-executor-<type>`):

  decode TaskInstance → read the cancelled-runs and finished-tasks buckets (a finished task: ack,
  nothing else; a bucket not complete, its key missing or naming another bucket: NAK, not run) → report the start (`RUNNING`) and wait for
  the stream's ack → run the handler (timeout, heartbeats) → publish one TaskResult to
  `results.<activity name>.<run id>` with `Nats-Msg-Id: <task id>:<attempt>:<STATUS>` and wait for
  the stream's ack → (DEAD only) publish the task to `dlq.tasks.<type>` → (a final result) mark
  the task finished → ack, or NAK with a delay.

Add a task type: write `async def handler(attempt: Attempt) -> JSON value`, raise
`PermanentError` for what no retry can fix and `RetryableError` (or any other exception) for what
another attempt may fix, and register it in HANDLERS. Pass `attempt.task.task_id` as the
idempotency key to whatever the handler calls: an attempt can run more than once.

Messages are protobuf. Rather than generated code (which needs protoc), the few messages an executor
needs are declared below as a table in .proto spelling and turned into a descriptor at start-up;
the `protobuf` package does the encoding. test_executor.py checks the table against
proto/taskfactory/v1/taskfactory.proto.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import signal
import socket
import ssl
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2  # noqa: F401  (registers the types)
from google.protobuf.message import DecodeError

log = logging.getLogger("python-executor")

# ------------------------------------------------------------------------------------------------
# The contract: names (services/taskfactory-model/src/subjects.rs) and messages (the .proto)

TASKS_STREAM = "FACTORY_TASKS"
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_ERROR = "Taskfactory-Error"
HEADER_ATTEMPTS = "Taskfactory-Attempts"
HEADER_ORIGINAL_SUBJECT = "Taskfactory-Original-Subject"
HEADER_ORIGINAL_SEQUENCE = "Taskfactory-Original-Sequence"
HEADER_ORIGINAL_STREAM = "Taskfactory-Original-Stream"
HEADER_DELIVERIES = "Taskfactory-Deliveries"
# W3C trace context: carried from the task message onto its result, so the result (and the rest of
# the run) stays in the fire's trace. An executor with OpenTelemetry would start its attempt span as
# a child of this context and send its own span's context instead.
TRACE_HEADERS = ("traceparent", "tracestate")
# KV bucket of cancelled runs (key: run id, value: the reason), written by the orchestrator before
# CancelRun returns: checked before every attempt, watched to stop attempts in flight.
CANCELLED_RUNS_BUCKET = "taskfactory_cancelled_runs"
# KV bucket of finished tasks (key: finished_task_key, `<task id>.<type>`; value: the highest
# attempt number whose final result is known, in decimal): read before every attempt, so that a finished task's
# message that comes back never runs again; written by this executor once the stream has a final
# result of its own (and by the orchestrator when it records one).
FINISHED_TASKS_BUCKET = "taskfactory_finished_tasks"
# The key of each bucket that says the bucket is complete (the orchestrator writes it once it
# refilled a bucket that was recreated empty): its value is the creation time of the bucket's
# stream, KV_<bucket> (RFC 3339). Without it, or with a value naming another time (a bucket since
# replaced), no entry proves a task unfinished or a run not cancelled.
FINISHED_TASKS_COMPLETE_KEY = "complete_by_type"
CANCELLED_RUNS_COMPLETE_KEY = "complete"


def finished_task_key(task_id: str, task_type: str) -> str:
    """A task's key in the finished-tasks bucket: by type, so that NATS permissions let an executor
    write its own types' entries only (`$KV.taskfactory_finished_tasks.*.<type>`)."""
    return f"{task_id}.{task_type}"


def rfc3339_instant(text: str) -> datetime:
    """An RFC 3339 time, to the microsecond (nats-py reads a stream's `created` so; the services
    write nanoseconds)."""
    text = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    return datetime.fromisoformat(text)


async def bucket_complete(js: Any, kv: Any, bucket: str, key: str) -> bool:
    """Whether the bucket is complete: its complete key is there and names the bucket's stream's
    creation time. Raises when that cannot be known."""
    from nats.js.errors import KeyNotFoundError

    async def held() -> bytes | None:
        try:
            return (await kv.get(key)).value or b""
        except KeyNotFoundError:
            return None

    value, info = await asyncio.gather(held(), js.stream_info(f"KV_{bucket}"))
    if value is None or info.created is None:
        return False
    try:
        return rfc3339_instant(value.decode()) == info.created
    except ValueError:  # not a time: proves nothing
        return False


def task_subject(task_type: str) -> str:
    return f"tasks.{task_type}"


def result_subject(activity_name: str, run_id: str) -> str:
    return f"results.{activity_name}.{run_id}"


def task_dlq_subject(task_type: str) -> str:
    return f"dlq.tasks.{task_type}"


def result_msg_id(task_id: str, attempt: int, status: str) -> str:
    return f"{task_id}:{attempt}:{status}"


def consumer_name(task_type: str) -> str:
    """The durable consumer of one task type; every replica of this executor binds the same one."""
    return f"python-executor-{task_type}"


# Copied from proto/taskfactory/v1/taskfactory.proto (type, name, number); test_executor.py fails
# when the two disagree. Field numbers are forever, so this only grows.
CONTRACT_MESSAGES: dict[str, list[tuple[str, str, int]]] = {
    "RetryPolicy": [
        ("uint32", "max_attempts", 1),
        ("google.protobuf.Duration", "initial_backoff", 2),
        ("google.protobuf.Duration", "max_backoff", 3),
        ("double", "multiplier", 4),
    ],
    "TaskInstance": [
        ("string", "task_id", 1),
        ("string", "run_id", 2),
        ("string", "activity_id", 3),
        ("uint32", "activity_version", 4),
        ("string", "template", 5),
        ("string", "type", 6),
        ("google.protobuf.Struct", "params", 7),
        ("RetryPolicy", "retry", 8),
        ("google.protobuf.Duration", "timeout", 9),
        ("google.protobuf.Timestamp", "created_at", 10),
        ("string", "activity_name", 11),
        ("uint32", "item_index", 12),
        ("uint32", "attempt_base", 13),
        ("string", "result_token", 15),
    ],
    "TaskResult": [
        ("string", "task_id", 1),
        ("string", "run_id", 2),
        ("string", "activity_id", 3),
        ("uint32", "attempt", 4),
        ("TaskStatus", "status", 5),
        ("string", "error", 6),
        ("google.protobuf.Value", "output", 7),
        ("google.protobuf.Timestamp", "finished_at", 8),
        ("string", "executor", 9),
        ("google.protobuf.Timestamp", "started_at", 10),
        ("string", "type", 11),
        ("bool", "retryable", 12),
        ("string", "result_token", 13),
        ("string", "execution", 14),
    ],
}
CONTRACT_ENUMS: dict[str, list[tuple[str, int]]] = {
    "TaskStatus": [
        ("TASK_STATUS_UNSPECIFIED", 0),
        ("PENDING", 1),
        ("RUNNING", 2),
        ("SUCCEEDED", 3),
        ("FAILED", 4),
        ("DEAD", 5),
        ("CANCELLED", 6),
        ("WAITING", 7),
    ],
}
PACKAGE = "taskfactory.v1"

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _F.TYPE_STRING,
    "uint32": _F.TYPE_UINT32,
    "uint64": _F.TYPE_UINT64,
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "double": _F.TYPE_DOUBLE,
    "bool": _F.TYPE_BOOL,
    "bytes": _F.TYPE_BYTES,
}


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def contract_file() -> descriptor_pb2.FileDescriptorProto:
    """The contract table as a FileDescriptorProto: what protoc would make of these messages."""
    file = descriptor_pb2.FileDescriptorProto(
        # Not the .proto's own name, so that generated code for the whole file can coexist.
        name="taskfactory/v1/python_executor_contract.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=[
            "google/protobuf/duration.proto",
            "google/protobuf/struct.proto",
            "google/protobuf/timestamp.proto",
        ],
    )
    for name, values in CONTRACT_ENUMS.items():
        enum = file.enum_type.add(name=name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for name, fields in CONTRACT_MESSAGES.items():
        message = file.message_type.add(name=name)
        for type_name, field_name, number in fields:
            field = message.field.add(
                name=field_name,
                number=number,
                label=_F.LABEL_OPTIONAL,
                json_name=_json_name(field_name),
            )
            if type_name in _SCALARS:
                field.type = _SCALARS[type_name]
            elif type_name in CONTRACT_ENUMS:
                field.type = _F.TYPE_ENUM
                field.type_name = f".{PACKAGE}.{type_name}"
            elif type_name in CONTRACT_MESSAGES:
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{type_name}"
            else:
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".{type_name}"
    return file


_POOL = descriptor_pool.Default()
_POOL.AddSerializedFile(contract_file().SerializeToString())
TaskInstance = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.TaskInstance"))
TaskResult = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.TaskResult"))
_STATUS = _POOL.FindEnumTypeByName(f"{PACKAGE}.TaskStatus")
SUCCEEDED = _STATUS.values_by_name["SUCCEEDED"].number
FAILED = _STATUS.values_by_name["FAILED"].number
DEAD = _STATUS.values_by_name["DEAD"].number
CANCELLED = _STATUS.values_by_name["CANCELLED"].number
RUNNING = _STATUS.values_by_name["RUNNING"].number


def status_name(status: int) -> str:
    return _STATUS.values_by_number[status].name


# Defaults for what a task leaves unset: the same as services/taskfactory-model/src/spec.rs.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INITIAL_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 60.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_TIMEOUT = 60.0

# ------------------------------------------------------------------------------------------------
# google.protobuf.Struct / Value ⇄ Python (JSON-like) values

MAX_SAFE_INTEGER = 2**53 - 1


def value_to_py(value: struct_pb2.Value) -> Any:
    """A Value as plain Python. Numbers are doubles on the wire; whole ones within 53 bits come back
    as int (as the services read them)."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= MAX_SAFE_INTEGER:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_py(value.struct_value)
    return [value_to_py(item) for item in value.list_value.values]


def struct_to_py(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: value_to_py(item) for key, item in struct.fields.items()}


def py_to_value(obj: Any, out: struct_pb2.Value | None = None) -> struct_pb2.Value:
    """Plain Python (what json.dumps accepts) as a Value; raises ValueError on anything else."""
    value = struct_pb2.Value() if out is None else out
    if obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, (int, float)):
        if not math.isfinite(obj):
            raise ValueError(f"{obj!r} is not a JSON number")
        value.number_value = float(obj)
    elif isinstance(obj, str):
        value.string_value = obj
    elif isinstance(obj, dict):
        value.struct_value.SetInParent()
        for key, item in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"object key {key!r} is not a string")
            py_to_value(item, value.struct_value.fields[key])
    elif isinstance(obj, (list, tuple)):
        value.list_value.SetInParent()
        for item in obj:
            py_to_value(item, value.list_value.values.add())
    else:
        raise ValueError(f"{type(obj).__name__} is not JSON")
    return value


# ------------------------------------------------------------------------------------------------
# Task types


class PermanentError(Exception):
    """No attempt can succeed (bad params, a 4xx answer): the task is DEAD at once."""


class RetryableError(Exception):
    """Another attempt may succeed (a timeout, a 5xx answer). Any other exception counts as one."""


@dataclass
class Attempt:
    task: Any  # TaskInstance
    params: dict[str, Any]
    number: int  # the attempt number reported in the TaskResult (1 for the first)


Handler = Callable[[Attempt], Awaitable[Any]]


async def uppercase(attempt: Attempt) -> Any:
    """params {text} → output {text: TEXT}. Blocking work belongs in asyncio.to_thread (or a process
    pool): a busy event loop cannot send the heartbeats that keep the message."""
    params = attempt.params
    text = params.get("text")
    if not isinstance(text, str):
        raise PermanentError(
            f"params.text is required and must be a string (got {type(text).__name__}: {text!r})"
        )
    fail_attempts = _number_param(params, "failAttempts")
    if attempt.number <= fail_attempts:
        raise RetryableError(
            f"simulated transient failure on attempt {attempt.number} (failAttempts: {fail_attempts:g})"
        )
    sleep_seconds = _number_param(params, "sleepSeconds")
    if sleep_seconds > 0:
        await asyncio.sleep(sleep_seconds)
    return {"text": text.upper()}


def _number_param(params: dict[str, Any], name: str) -> float:
    value = params.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PermanentError(f"params.{name} must be a number (got {value!r})")
    return value


HANDLERS: dict[str, Handler] = {"uppercase": uppercase}

# ------------------------------------------------------------------------------------------------
# The executor


def backoff(max_backoff: float, initial: float, multiplier: float, attempt: int) -> float:
    """Seconds before the next attempt: exponential, ±20% jitter, capped (as the built-in one)."""
    base = initial * multiplier ** max(attempt - 1, 0)
    return min(min(base, max_backoff) * random.uniform(0.8, 1.2), max_backoff)


def trace_context(headers) -> dict:
    """The W3C trace context headers of a message (any case), as they should go out again."""
    return {name.lower(): value for name, value in (headers or {}).items() if name.lower() in TRACE_HEADERS}


def one_line(text: str, limit: int = 2048) -> str:
    """A header value: no control characters, at most `limit` bytes of UTF-8."""
    line = "".join(" " if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text)
    encoded = line.encode()
    if len(encoded) <= limit:
        return line
    return encoded[:limit].decode(errors="ignore")


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def already_finished(finished_by: int, attempt_base: int) -> bool:
    """Whether a task message of the series after `attempt_base` was already decided by the attempt
    `finished_by` (from the finished-tasks bucket): it was if that attempt is of this series or a
    later one. A RetryTask redrive starts a series after every attempt so far, so its message runs.
    (services/taskfactory-model/src/results.rs, `already_finished`.)"""
    return finished_by > attempt_base


MAX_ATTEMPT = 2**32 - 1  # attempt numbers are uint32


def parse_finished_by(value: bytes | None) -> int | None:
    """A finished-tasks value as the built-in executor reads it: decimal text, surrounding
    whitespace ignored; None for anything else (such a value finishes nothing)."""
    try:
        text = (value or b"").decode().strip()
    except UnicodeDecodeError:
        return None
    digits = text[1:] if text.startswith("+") else text
    if not (digits.isascii() and digits.isdigit()):
        return None
    number = int(digits)
    return number if number <= MAX_ATTEMPT else None


class Cancellations:
    """Cancelled runs: the KV bucket checked before each attempt, and watched to stop attempts in
    flight (each registers an event that is set when its run is cancelled)."""

    def __init__(self, js: Any) -> None:
        self.js = js
        self.kv: Any = None
        self.in_flight: dict[str, set[asyncio.Event]] = {}

    async def bucket(self) -> Any:
        if self.kv is None:  # the services create it; until they have, this raises
            self.kv = await self.js.key_value(CANCELLED_RUNS_BUCKET)
        return self.kv

    async def reason(self, run_id: str) -> str | None:
        """Why the run was cancelled, or None; raises when that cannot be known."""
        from nats.js.errors import KeyNotFoundError

        kv = await self.bucket()
        try:
            entry = await kv.get(run_id)
        except KeyNotFoundError:
            return None
        return (entry.value or b"").decode(errors="replace") or "cancelled"

    async def complete(self) -> bool:
        """Whether the bucket is complete (its key names the bucket), so that no entry means not
        cancelled; raises when that cannot be known."""
        kv = await self.bucket()
        return await bucket_complete(self.js, kv, CANCELLED_RUNS_BUCKET, CANCELLED_RUNS_COMPLETE_KEY)

    def register(self, run_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self.in_flight.setdefault(run_id, set()).add(event)
        return event

    def unregister(self, run_id: str, event: asyncio.Event) -> None:
        events = self.in_flight.get(run_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self.in_flight[run_id]

    def cancelled(self, run_id: str) -> None:
        for event in self.in_flight.pop(run_id, ()):
            event.set()

    async def watch(self, stop: asyncio.Event) -> None:
        """Sets the events of attempts in flight whose run gets cancelled, until `stop`."""
        pause = 0.5
        while not stop.is_set():
            watcher = None
            try:
                watcher = await (await self.bucket()).watchall()
                pause = 0.5
                while not stop.is_set():
                    try:
                        entry = await watcher.updates(timeout=1.0)
                    except asyncio.TimeoutError:
                        continue
                    if entry is not None and entry.operation is None:  # a put: the run is cancelled
                        self.cancelled(entry.key)
            except Exception as error:
                log.warning("cannot watch %s (%s); retrying", CANCELLED_RUNS_BUCKET, error)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
            finally:
                if watcher is not None:
                    await _quietly(watcher.stop())


class FinishedTasks:
    """Finished tasks: the KV bucket read before each attempt (the attempt number that decided the
    task, if it is finished)."""

    def __init__(self, js: Any) -> None:
        self.js = js
        self.kv: Any = None

    async def bucket(self) -> Any:
        if self.kv is None:  # the services create it; until they have, this raises
            self.kv = await self.js.key_value(FINISHED_TASKS_BUCKET)
        return self.kv

    async def finished_by(self, key: str) -> int | None:
        """The attempt that decided the task whose key (finished_task_key) this is, or None if it
        is not finished; raises when that cannot be known."""
        from nats.js.errors import InvalidKeyError, KeyNotFoundError

        kv = await self.bucket()
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # also a deleted key
            return None
        except InvalidKeyError:  # no task of the orchestrator's has such a key (UUIDs and types)
            return None
        return parse_finished_by(entry.value)

    async def complete(self) -> bool:
        """Whether the bucket is complete (its key names the bucket); raises when that cannot be
        known."""
        kv = await self.bucket()
        return await bucket_complete(self.js, kv, FINISHED_TASKS_BUCKET, FINISHED_TASKS_COMPLETE_KEY)

    async def mark(self, key: str, attempt: int) -> None:
        """Raises the task's entry (its finished_task_key) to `attempt`: created if absent, else compare-and-set, and only
        upwards (services/taskfactory-runtime/src/finished_tasks.rs, `raise`). Raises when it
        cannot be written."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        kv = await self.bucket()
        value = str(attempt).encode()
        for _ in range(5):  # another writer in between: look again
            try:
                await kv.create(key, value)
                return
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            held = parse_finished_by(entry.value)
            if held is not None and held >= attempt:
                return
            try:
                await kv.update(key, value, last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"conflicting writes to the entry {key}")


class Executor:
    """Runs task messages of the types in `handlers`; one durable pull consumer per type."""

    FETCH_EXPIRY = 2.0  # seconds a pull waits for messages; also the longest SIGTERM → stop delay
    PUBLISH_TIMEOUT = 5.0
    SETTLE_RETRY = 1.0  # seconds before a message whose outcome could not be reported runs again
    UNPROVEN_RETRY = 5.0  # seconds before a task not proven unfinished (a refill) is looked at again

    def __init__(
        self,
        js: Any,
        name: str,
        handlers: dict[str, Handler],
        *,
        ack_wait: float = 30.0,
        concurrency: int = 4,
        max_ack_pending: int = 256,
        drain_timeout: float = 30.0,
    ) -> None:
        self.js = js
        self.name = name
        self.handlers = handlers
        self.ack_wait = ack_wait
        self.concurrency = max(1, concurrency)
        self.max_ack_pending = max_ack_pending
        self.drain_timeout = drain_timeout
        self.cancellations = Cancellations(js)
        self.finished = FinishedTasks(js)

    # -------------------------------------------------------------------------- consuming

    async def bind(self, task_type: str) -> Any:
        """Creates (or updates) the durable consumer and binds a pull subscription to it."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        durable = consumer_name(task_type)
        await self.js.add_consumer(
            TASKS_STREAM,
            ConsumerConfig(
                name=durable,
                durable_name=durable,
                filter_subject=task_subject(task_type),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.ack_wait,
                # Attempts are counted by the executor (retry.maxAttempts), not by the server.
                max_deliver=-1,
                # Bounds the messages in hand over all replicas; each pulls only for its free slots.
                max_ack_pending=self.max_ack_pending,
            ),
        )
        return await self.js.pull_subscribe_bind(durable=durable, stream=TASKS_STREAM)

    async def serve(self, task_type: str, stop: asyncio.Event) -> None:
        """Pulls and runs tasks of one type until `stop`; then finishes the ones in hand."""
        in_flight: set[asyncio.Task] = set()
        stopped = asyncio.ensure_future(stop.wait())
        subscription = None
        pause = 0.1
        while not stop.is_set():
            if subscription is None:
                try:
                    subscription = await self.bind(task_type)
                    log.info("serving %s (consumer %s on %s)", task_type, consumer_name(task_type), TASKS_STREAM)
                except Exception as error:  # the stream is not declared yet, NATS is away, ...
                    log.warning("cannot consume %s yet: %s; retrying", task_subject(task_type), error)
                    await asyncio.wait({stopped}, timeout=pause)
                    pause = min(pause * 2, 5.0)
                    continue
            free = self.concurrency - len(in_flight)
            if free <= 0:
                await asyncio.wait(in_flight | {stopped}, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                # Only as many as there are free slots: nothing waits in a buffer while its ack_wait
                # runs out. With nats-py 2.16 the pull returns as soon as one message is there.
                messages = await subscription.fetch(free, timeout=self.FETCH_EXPIRY)
            except asyncio.TimeoutError:  # nothing to do (nats.errors.TimeoutError is one too)
                continue
            except Exception as error:
                log.warning("pull on %s failed: %s; binding again", task_subject(task_type), error)
                subscription = None
                await asyncio.wait({stopped}, timeout=pause)
                pause = min(pause * 2, 5.0)
                continue
            pause = 0.1
            for message in messages:
                if stop.is_set():
                    # Delivered but not started: hand it back at once for another replica.
                    await _quietly(message.nak())
                    continue
                task = asyncio.create_task(self.handle(task_type, message))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        stopped.cancel()
        if in_flight:
            log.info("%s: finishing %d task(s) in hand", task_type, len(in_flight))
            _, pending = await asyncio.wait(in_flight, timeout=self.drain_timeout)
            if pending:
                log.warning(
                    "%s: %d task(s) still running after %ss; they run again after ack_wait",
                    task_type,
                    len(pending),
                    self.drain_timeout,
                )
                for task in pending:
                    task.cancel()
        if subscription is not None:
            await _quietly(subscription.unsubscribe())

    async def handle(self, task_type: str, message: Any) -> None:
        try:
            await self.process(task_type, message)
        except Exception:
            log.exception("unexpected error on %s; the task runs again", message.subject)
            await _quietly(message.nak(delay=self.SETTLE_RETRY))

    # -------------------------------------------------------------------------- one attempt

    async def process(self, task_type: str, message: Any) -> None:
        """One delivery = one attempt = one TaskResult, then the message is settled."""
        try:
            task = TaskInstance.FromString(message.data)
        except DecodeError as error:
            await self.reject(task_type, message, f"not a TaskInstance: {error}")
            return
        if not task.task_id:
            await self.reject(task_type, message, "task message has no task_id")
            return

        delivered = max(1, message.metadata.num_delivered)
        attempt = task.attempt_base + delivered  # attempt_base > 0 after a RetryTask redrive
        retry = task.retry
        max_attempts = retry.max_attempts or DEFAULT_MAX_ATTEMPTS
        timeout = _seconds(task.timeout) if task.HasField("timeout") else 0.0
        timeout = timeout if timeout > 0 else DEFAULT_TIMEOUT
        handler = self.handlers.get(task.type) or self.handlers.get(task_type)

        started_at = datetime.now(timezone.utc)
        # Registered before the checks, so a cancel that lands in between is still seen.
        cancel = self.cancellations.register(task.run_id)
        try:
            outcome = await self.start_and_run(message, task, handler, attempt, timeout, started_at, cancel)
        finally:
            self.cancellations.unregister(task.run_id, cancel)
        if outcome is None:
            return  # settled already: a finished task (acked), or one that could not start (NAKed)
        status, error_text, output = outcome
        if status == FAILED and delivered >= max_attempts:
            status = DEAD  # that was the last attempt

        result = TaskResult(
            task_id=task.task_id,
            run_id=task.run_id,
            activity_id=task.activity_id,
            attempt=attempt,
            status=status,
            error=error_text,
            executor=self.name,
            type=task.type,
            retryable=status == FAILED,
            result_token=task.result_token,
        )
        result.started_at.FromDatetime(started_at)
        result.finished_at.FromDatetime(datetime.now(timezone.utc))
        if output is not None:
            result.output.CopyFrom(output)

        # 1. The outcome first, and wait for the stream's ack: a crash after this point only means
        #    the task runs again, and the orchestrator keeps the first terminal result.
        try:
            await self.js.publish(
                result_subject(task.activity_name, task.run_id),
                result.SerializeToString(),
                timeout=self.PUBLISH_TIMEOUT,
                headers={
                    HEADER_MSG_ID: result_msg_id(task.task_id, attempt, status_name(status)),
                    **trace_context(message.headers),
                },
            )
        except Exception as publish_error:
            log.warning("task %s: cannot report the result (%s); it runs again", task.task_id, publish_error)
            await _quietly(message.nak(delay=self.SETTLE_RETRY))
            return

        # 2. A dead task is also kept on dlq.tasks.<type> for operators (the orchestrator does not
        #    do this for external types).
        if status == DEAD:
            try:
                headers = dead_letter_headers(message, error_text)
                headers[HEADER_ATTEMPTS] = str(attempt)
                await self.js.publish(
                    task_dlq_subject(task_type),
                    message.data,
                    timeout=self.PUBLISH_TIMEOUT,
                    headers=headers,
                )
            except Exception as publish_error:
                log.warning("task %s: cannot dead-letter (%s); it runs again", task.task_id, publish_error)
                await _quietly(message.nak(delay=self.SETTLE_RETRY))
                return

        # 3. A final result is on the stream: mark the task finished before settling, so a copy of
        #    its message that comes back never runs again, even before the orchestrator records
        #    the result. Best effort: the orchestrator writes it too when it does.
        if status != FAILED:
            try:
                await self.finished.mark(finished_task_key(task.task_id, task.type), attempt)
            except Exception as error:
                log.warning("task %s: cannot mark it finished (%s); the orchestrator will", task.task_id, error)

        # 4. Settle: done (SUCCEEDED, DEAD, CANCELLED) or another attempt after the backoff (FAILED).
        if status == FAILED:
            delay = backoff(
                _seconds(retry.max_backoff) if retry.HasField("max_backoff") else DEFAULT_MAX_BACKOFF,
                _seconds(retry.initial_backoff) if retry.HasField("initial_backoff") else DEFAULT_INITIAL_BACKOFF,
                retry.multiplier if retry.multiplier >= 1.0 else DEFAULT_MULTIPLIER,
                delivered,
            )
            log.warning(
                "task %s attempt %d failed: %s; retry in %.1fs", task.task_id, attempt, error_text, delay
            )
            await message.nak(delay=delay)
        else:
            if status == DEAD:
                log.warning("task %s dead after attempt %d: %s", task.task_id, attempt, error_text)
            elif status == CANCELLED:
                log.info("task %s not run: %s", task.task_id, error_text)
            else:
                log.info("task %s succeeded (attempt %d)", task.task_id, attempt)
            await message.ack()

    async def start_and_run(
        self, message: Any, task: Any, handler: Handler | None, attempt: int, timeout: float,
        started_at: datetime, cancel: asyncio.Event,
    ) -> tuple | None:
        """The checks, the start report, then the handler (stopped if the run is cancelled meanwhile):
        (status, error, output Value or None) to report; None when the message was settled here
        (its task is finished: acked; a check or the start report failed: NAKed, not run)."""
        # Both buckets at once: was the run cancelled, is the task finished (and is each bucket
        # complete, so that no entry means not cancelled, not finished)?
        checks = await asyncio.gather(
            self.cancellations.reason(task.run_id),
            self.cancellations.complete(),
            self.finished.finished_by(finished_task_key(task.task_id, task.type)),
            self.finished.complete(),
            return_exceptions=True,
        )
        whats = ("whether its run was cancelled",) * 2 + ("whether it is finished",) * 2
        for what, outcome in zip(whats, checks):
            if isinstance(outcome, BaseException):
                log.warning("task %s: cannot check %s (%s); retrying", task.task_id, what, outcome)
                await _quietly(message.nak(delay=self.SETTLE_RETRY))
                return None
        cancelled, cancelled_complete, finished_by, finished_complete = checks
        if finished_by is not None and already_finished(finished_by, task.attempt_base):
            # Its message came back after the task ended (a consumer recreated over messages a
            # server failed to remove, a copy published again): never run it again, report nothing.
            log.warning("task %s already finished (by attempt %d); not run again", task.task_id, finished_by)
            await message.ack()
            return None
        if not finished_complete or (cancelled is None and not cancelled_complete):
            # A bucket was recreated and the orchestrator has not refilled it yet: the task may be
            # finished, or its run cancelled. Not run; back after a while (each delivery counts
            # toward the limit: the built-in executor keeps the message and pulls no more instead).
            log.warning("task %s: a bucket is being refilled; retrying", task.task_id)
            await _quietly(message.nak(delay=self.UNPROVEN_RETRY))
            return None
        if cancelled is not None:
            return CANCELLED, cancelled, None

        # Alive from here: the start report's ack may take a while too.
        heartbeat = asyncio.create_task(_heartbeat(message, self.ack_wait / 3))
        try:
            # Every start is on record before anything runs: a start whose result a crash loses
            # still shows in the attempt history, and a task whose reports can go nowhere never runs.
            try:
                await self.report_started(task, attempt, started_at, message.headers)
            except Exception as error:
                log.warning("task %s: cannot report it started (%s); not run, retrying", task.task_id, error)
                await _quietly(message.nak(delay=self.SETTLE_RETRY))
                return None
            work = asyncio.create_task(self.run_handler(handler, task, attempt, timeout))
            cancel_wait = asyncio.create_task(cancel.wait())
            try:
                await asyncio.wait({work, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                cancel_wait.cancel()
                if not work.done():
                    work.cancel()  # the run was cancelled (or this executor is being torn down)
        finally:
            heartbeat.cancel()
        if work.done() and not work.cancelled():
            return work.result()
        return CANCELLED, "the run was cancelled while the task ran", None

    async def report_started(self, task: Any, attempt: int, started_at: datetime, headers: Any) -> None:
        """Reports this execution of the attempt started (`RUNNING`, with an execution id of its
        own: an attempt can run more than once, and each start is a row of the task's attempt
        history) and waits for the stream's ack; raises when it could not be sent."""
        execution = str(uuid.uuid4())
        report = TaskResult(
            task_id=task.task_id,
            run_id=task.run_id,
            activity_id=task.activity_id,
            attempt=attempt,
            status=RUNNING,
            executor=self.name,
            type=task.type,
            result_token=task.result_token,
            execution=execution,
        )
        report.started_at.FromDatetime(started_at)
        await self.js.publish(
            result_subject(task.activity_name, task.run_id),
            report.SerializeToString(),
            timeout=self.PUBLISH_TIMEOUT,
            headers={
                HEADER_MSG_ID: f'{result_msg_id(task.task_id, attempt, "RUNNING")}:{execution}',
                **trace_context(headers),
            },
        )

    async def run_handler(self, handler: Handler | None, task: Any, attempt: int, timeout: float) -> tuple:
        """Runs the handler under the task's timeout: (status, error, output Value or None)."""
        try:
            if handler is None:
                raise PermanentError(f"this executor does not serve task type {task.type!r}")
            params = struct_to_py(task.params)
            result = await asyncio.wait_for(handler(Attempt(task, params, attempt)), timeout)
            try:
                return SUCCEEDED, "", py_to_value(result)
            except ValueError as error:
                raise PermanentError(f"the handler's output is not JSON: {error}") from error
        except PermanentError as error:
            return DEAD, str(error) or type(error).__name__, None
        except asyncio.TimeoutError:
            return FAILED, f"timed out after {timeout:g}s", None
        except Exception as error:  # RetryableError and anything unexpected
            if not isinstance(error, RetryableError):
                log.warning("task %s: unexpected %s", task.task_id, type(error).__name__, exc_info=True)
            return FAILED, str(error) or type(error).__name__, None

    async def reject(self, task_type: str, message: Any, error: str) -> None:
        """A message that is no task: straight to the DLQ with its origin, never redelivered."""
        log.error("undecodable message on %s: %s; dead-lettered", message.subject, error)
        headers = dead_letter_headers(message, error)
        try:
            await self.js.publish(
                task_dlq_subject(task_type), message.data, timeout=self.PUBLISH_TIMEOUT, headers=headers
            )
        except Exception as publish_error:
            log.warning("cannot dead-letter (%s); redelivering later", publish_error)
            await _quietly(message.nak(delay=5.0))
            return
        await message.term()


def _nanos(stamp: Any) -> int:
    """A message's storage time in unix nanoseconds (0 when unknown)."""
    try:
        return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1_000
    except (AttributeError, TypeError, ValueError, OverflowError):
        return 0


def dead_letter_headers(message: Any, error: str) -> dict:
    """The one dead-letter format (as the Rust services write it): the message's own headers, the
    error, where it came from (subject, stream, stream sequence) and how often it was delivered;
    deduplicated by its stream and sequence."""
    metadata = message.metadata
    stream, sequence = metadata.stream, metadata.sequence.stream
    stored = _nanos(getattr(metadata, "timestamp", None))
    headers = dict(message.headers or {})
    headers.update(
        {
            # The time it was stored too: a stream declared again numbers from 1 again.
            HEADER_MSG_ID: f"dlq:{stream}:{sequence}:{stored}",
            HEADER_ERROR: one_line(error),
            HEADER_ORIGINAL_SUBJECT: message.subject,
            HEADER_ORIGINAL_STREAM: stream,
            HEADER_ORIGINAL_SEQUENCE: str(sequence),
            HEADER_DELIVERIES: str(metadata.num_delivered),
        }
    )
    return headers


async def _heartbeat(message: Any, every: float) -> None:
    """Progress acks while the handler runs, so ack_wait never runs out on a long task."""
    while True:
        await asyncio.sleep(every)
        await _quietly(message.in_progress())


async def _quietly(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception as error:
        log.debug("ignored: %s", error)


# ------------------------------------------------------------------------------------------------
# The process


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="taskfactory executor for the task types " + ", ".join(HANDLERS))
    parser.add_argument("--nats-url", default=env("NATS_URL", "nats://127.0.0.1:4222"),
                        help="NATS server(s), comma-separated (env NATS_URL)")
    parser.add_argument("--task-types", default=env("PYTHON_EXECUTOR_TASK_TYPES", ",".join(HANDLERS)),
                        help="task types to serve, comma-separated (env PYTHON_EXECUTOR_TASK_TYPES)")
    parser.add_argument("--name", default=env("TASKFACTORY_EXECUTOR_NAME") or
                        f"python-executor@{socket.gethostname()}:{os.getpid()}",
                        help="this executor's name in results (env TASKFACTORY_EXECUTOR_NAME)")
    parser.add_argument("--concurrency", type=int, default=int(env("PYTHON_EXECUTOR_CONCURRENCY", "4")),
                        help="tasks of one type at once (env PYTHON_EXECUTOR_CONCURRENCY)")
    parser.add_argument("--ack-wait", type=float, default=float(env("PYTHON_EXECUTOR_ACK_WAIT", "30")),
                        help="seconds without a heartbeat before a task is redelivered (env PYTHON_EXECUTOR_ACK_WAIT)")
    parser.add_argument("--max-ack-pending", type=int, default=int(env("PYTHON_EXECUTOR_MAX_ACK_PENDING", "256")),
                        help="messages in hand over all replicas (env PYTHON_EXECUTOR_MAX_ACK_PENDING)")
    parser.add_argument("--drain-timeout", type=float, default=float(env("PYTHON_EXECUTOR_DRAIN_TIMEOUT", "30")),
                        help="at shutdown, seconds for the tasks in hand (env PYTHON_EXECUTOR_DRAIN_TIMEOUT)")
    parser.add_argument("--startup-patience", type=float, default=60.0,
                        help="seconds to wait for NATS at start")
    args = parser.parse_args(argv)
    args.task_types = [t.strip() for t in args.task_types.split(",") if t.strip()]
    unknown = [t for t in args.task_types if t not in HANDLERS]
    if unknown or not args.task_types:
        parser.error(f"unknown task type(s) {unknown}; this executor has {sorted(HANDLERS)}")
    return args


def tls_context(environ=os.environ) -> ssl.SSLContext | None:
    """TLS as the services take it: NATS_CA (PEM of the CA that signed the server), NATS_CERT and
    NATS_KEY (a client certificate, for servers that verify clients), NATS_TLS=true; None when
    none is set (a tls:// URL still asks nats-py for TLS with the system's roots)."""
    ca, cert, key = environ.get("NATS_CA"), environ.get("NATS_CERT"), environ.get("NATS_KEY")
    if not (ca or cert or key or environ.get("NATS_TLS", "").lower() == "true"):
        return None
    if bool(cert) != bool(key):
        raise SystemExit("NATS_CERT and NATS_KEY go together: a client certificate needs its key")
    context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    if cert:
        context.load_cert_chain(cert, key)
    return context


async def connect(args: argparse.Namespace, stop: asyncio.Event) -> Any:
    """Connects (waiting for NATS up to --startup-patience, or until stopped); None if stopped."""
    import nats

    async def on_error(error: Exception) -> None:
        log.warning("nats: %s", error)

    async def on_disconnected() -> None:
        if not stop.is_set():  # at shutdown, closing the connection is no news
            log.warning("nats: disconnected; reconnecting")

    async def on_reconnected() -> None:
        log.info("nats: reconnected")

    options: dict[str, Any] = {}
    if os.environ.get("NATS_CREDS"):
        options["user_credentials"] = os.environ["NATS_CREDS"]
    elif os.environ.get("NATS_USER"):
        options["user"] = os.environ["NATS_USER"]
        options["password"] = os.environ.get("NATS_PASSWORD", "")
    elif os.environ.get("NATS_TOKEN"):
        options["token"] = os.environ["NATS_TOKEN"]
    if os.environ.get("NATS_INBOX_PREFIX"):  # a NATS user allowed only its own replies
        options["inbox_prefix"] = os.environ["NATS_INBOX_PREFIX"].encode()
    context = tls_context()
    if context is not None:
        options["tls"] = context
    connecting = asyncio.ensure_future(
        nats.connect(
            servers=[s.strip() for s in args.nats_url.split(",") if s.strip()],
            name=args.name,
            max_reconnect_attempts=-1,  # also retries the first connection
            reconnect_time_wait=1,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
            **options,
        )
    )
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({connecting, stopped}, timeout=args.startup_patience,
                                 return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if connecting in done:
        return connecting.result()
    connecting.cancel()
    if stop.is_set():
        return None
    raise SystemExit(f"no NATS at {args.nats_url} within {args.startup_patience:g}s")


async def main(argv: list[str]) -> int:
    args = parse_args(argv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            log.warning("%s again: exiting now", name)
            os._exit(1)
        log.info("%s: no new tasks; finishing the ones in hand (again to exit at once)", name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    nc = await connect(args, stop)
    if nc is None:
        return 0
    executor = Executor(
        nc.jetstream(timeout=10),
        args.name,
        HANDLERS,
        ack_wait=args.ack_wait,
        concurrency=args.concurrency,
        max_ack_pending=args.max_ack_pending,
        drain_timeout=args.drain_timeout,
    )
    log.info("%s connected to %s", args.name, args.nats_url)
    await asyncio.gather(
        executor.cancellations.watch(stop),
        *(executor.serve(task_type, stop) for task_type in args.task_types),
    )
    try:
        await asyncio.wait_for(nc.drain(), 5)  # flushes the last acks
    except Exception as error:
        log.warning("closing the NATS connection: %s", error)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("PYTHON_EXECUTOR_LOG", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(asyncio.run(main(sys.argv[1:])))
