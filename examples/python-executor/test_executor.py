"""Unit tests of the Python executor: the contract table against the .proto, the value conversions,
the `uppercase` handler, and one attempt end to end against a fake message, a fake JetStream and
fake buckets (what is published, with which headers, in which order: the start report before the
handler runs, the task settled only after the publishes; finished tasks and cancelled runs).

    PYTHONPATH=.tools/python python3 -m unittest discover -s examples/python-executor -v

The end-to-end test against the real services is tests/e2e/external_executor.rs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import re
import unittest
import uuid
from pathlib import Path
from types import SimpleNamespace

import executor as ex

ex.log.disabled = True  # the attempts below log as they would in production

PROTO = Path(__file__).resolve().parents[2] / "proto" / "taskfactory" / "v1" / "taskfactory.proto"


def _blocks(text: str, keyword: str) -> dict[str, str]:
    """Top-level `message X { … }` / `enum X { … }` bodies of a .proto, comments removed."""
    text = re.sub(r"//[^\n]*", "", text)
    blocks = {}
    for match in re.finditer(rf"(?m)^{keyword}\s+(\w+)\s*\{{", text):
        depth, start = 1, match.end()
        end = start
        while depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        blocks[match.group(1)] = text[start : end - 1]
    return blocks


class ContractMatchesTheProto(unittest.TestCase):
    """The executor's table of TaskInstance/TaskResult/RetryPolicy/TaskStatus is the .proto's."""

    def setUp(self) -> None:
        if not PROTO.exists():
            self.skipTest(f"{PROTO} not found (the example outside its repository)")
        self.text = PROTO.read_text()

    def test_messages(self) -> None:
        messages = _blocks(self.text, "message")
        for name, fields in ex.CONTRACT_MESSAGES.items():
            self.assertIn(name, messages, f"message {name} is gone from {PROTO.name}")
            in_proto = [
                (modifier.strip(), type_name, field, int(number))
                for modifier, type_name, field, number in re.findall(
                    r"((?:optional|repeated)\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;", messages[name]
                )
            ]
            self.assertEqual(
                sorted((t, f, n) for _, t, f, n in in_proto),
                sorted(fields),
                f"{name} in {PROTO.name} differs from CONTRACT_MESSAGES in executor.py: update the table "
                "(and the executor, if the new field changes what an executor must do)",
            )
            self.assertEqual([m for m, *_ in in_proto if m], [], f"{name}: only singular fields are expected")

    def test_enums(self) -> None:
        enums = _blocks(self.text, "enum")
        for name, values in ex.CONTRACT_ENUMS.items():
            self.assertIn(name, enums)
            in_proto = [(v, int(n)) for v, n in re.findall(r"(\w+)\s*=\s*(\d+)\s*;", enums[name])]
            self.assertEqual(sorted(in_proto), sorted(values), f"enum {name} differs from CONTRACT_ENUMS")

    def test_the_descriptor_has_every_field_with_its_number(self) -> None:
        for name, fields in ex.CONTRACT_MESSAGES.items():
            descriptor = ex._POOL.FindMessageTypeByName(f"taskfactory.v1.{name}")
            self.assertEqual(
                sorted((f.name, f.number) for f in descriptor.fields), sorted((f, n) for _, f, n in fields)
            )
        # The wire bytes of a known message: field 1 (task_id) is tag 0x0a, field 13 (attempt_base) 0x68.
        self.assertEqual(ex.TaskInstance(task_id="t", attempt_base=2).SerializeToString(), b"\x0a\x01t\x68\x02")
        self.assertEqual(ex.TaskResult(status=ex.DEAD, retryable=True).SerializeToString(), b"\x28\x05\x60\x01")


class Values(unittest.TestCase):
    def test_round_trip(self) -> None:
        value = {"s": "x", "i": 2, "f": 2.5, "b": True, "n": None, "l": [1, "a", [], {}], "o": {"k": -3}}
        self.assertEqual(ex.value_to_py(ex.py_to_value(value)), value)
        self.assertIsInstance(ex.value_to_py(ex.py_to_value(7)), int, "whole numbers come back as int")
        self.assertIsInstance(ex.value_to_py(ex.py_to_value(2.0**60)), float, "beyond 53 bits: float")

    def test_what_is_not_json_is_refused(self) -> None:
        for bad in (math.nan, math.inf, {1: "x"}, object(), b"bytes"):
            with self.assertRaises(ValueError, msg=repr(bad)):
                ex.py_to_value(bad)

    def test_struct(self) -> None:
        task = ex.TaskInstance()
        task.params.update({"text": "hi", "n": 3})
        self.assertEqual(ex.struct_to_py(task.params), {"text": "hi", "n": 3})
        self.assertEqual(ex.struct_to_py(ex.TaskInstance().params), {})


def _run(coroutine):
    return asyncio.run(coroutine)


class Uppercase(unittest.TestCase):
    def attempt(self, params, number=1):
        return ex.Attempt(ex.TaskInstance(task_id="t"), params, number)

    def test_upper_cases_text(self) -> None:
        self.assertEqual(_run(ex.uppercase(self.attempt({"text": "Grüße"}))), {"text": "GRÜSSE"})

    def test_missing_or_wrong_text_is_permanent(self) -> None:
        for params in ({}, {"text": None}, {"text": 3}, {"text": "x", "failAttempts": "two"}):
            with self.assertRaises(ex.PermanentError, msg=repr(params)):
                _run(ex.uppercase(self.attempt(params)))

    def test_fail_attempts_fails_the_first_ones(self) -> None:
        with self.assertRaises(ex.RetryableError):
            _run(ex.uppercase(self.attempt({"text": "x", "failAttempts": 2}, number=2)))
        self.assertEqual(_run(ex.uppercase(self.attempt({"text": "x", "failAttempts": 2}, number=3))), {"text": "X"})


class Helpers(unittest.TestCase):
    def test_backoff_grows_with_jitter_and_a_cap(self) -> None:
        for _ in range(100):
            self.assertTrue(0.8 <= ex.backoff(10, 1, 2, 1) <= 1.2)
            self.assertTrue(3.2 <= ex.backoff(10, 1, 2, 3) <= 4.8)
            self.assertLessEqual(ex.backoff(10, 1, 2, 30), 10)

    def test_one_line(self) -> None:
        self.assertEqual(ex.one_line("a\nb\tc"), "a b c")
        self.assertEqual(len(ex.one_line("é" * 5000).encode()), 2048)


# ------------------------------------------------------------------------------------------------
# One attempt against fakes


class FakeMessage:
    def __init__(self, data: bytes, events: list, delivered: int = 1) -> None:
        self.data = data
        self.subject = "tasks.uppercase"
        self.headers = {"Nats-Msg-Id": "original"}
        self.metadata = SimpleNamespace(
            num_delivered=delivered, stream="FACTORY_TASKS", sequence=SimpleNamespace(stream=7)
        )
        self.events = events

    async def ack(self):
        self.events.append(("ack",))

    async def nak(self, delay=None):
        self.events.append(("nak", delay))

    async def term(self):
        self.events.append(("term",))

    async def in_progress(self):
        self.events.append(("in_progress",))


class FakeJetStream:
    """Records each publish when the stream acks it (after `ack_delay` seconds); a publish for
    which `fail(headers)` is true fails instead (`fail=True`: every publish)."""

    def __init__(self, events: list, fail=False, ack_delay: float = 0.0) -> None:
        self.events = events
        self.fail = (lambda headers: True) if fail is True else (fail or (lambda headers: False))
        self.ack_delay = ack_delay

    async def stream_info(self, name):
        """Every bucket's stream was created at BUCKETS_CREATED."""
        return SimpleNamespace(created=ex.rfc3339_instant(BUCKETS_CREATED))

    async def publish(self, subject, payload, timeout=None, headers=None):
        if self.ack_delay:
            await asyncio.sleep(self.ack_delay)
        if self.fail(headers or {}):
            raise ConnectionError("no responders")
        self.events.append(("publish", subject, dict(headers or {}), payload))
        return SimpleNamespace(stream="S", seq=1, duplicate=False)


def is_start(headers) -> bool:
    return ":RUNNING:" in headers.get("Nats-Msg-Id", "")


TASK_ID = "0b6f4a34-0000-4000-8000-000000000001"
# Its key in the finished-tasks bucket.
TASK_KEY = f"{TASK_ID}.uppercase"
# When the fake buckets' streams were created, as the server says it (to the nanosecond).
BUCKETS_CREATED = "2026-12-06T00:00:00.123456789Z"


def task_bytes(params=None, **fields) -> bytes:
    task = ex.TaskInstance(
        task_id=TASK_ID,
        run_id="run-1",
        activity_id="act-1",
        activity_name="shout",
        template="upper",
        type="uppercase",
        **fields,
    )
    if params is not None:
        task.params.update(params)
    return task.SerializeToString()


class FakeKeyValue:
    """A KV bucket (cancelled runs: run id → reason; finished tasks: task id → attempt): `entries`
    maps keys to values; `broken` makes reads fail; with a `rendezvous`, a read waits (up to a
    second, else it fails) until the other bucket is being read too."""

    def __init__(self, entries=None, broken=False, rendezvous=None) -> None:
        self.entries = dict(entries or {})
        self.broken = broken
        self.rendezvous = rendezvous

    async def get(self, key):
        from nats.js.errors import KeyNotFoundError

        if self.rendezvous is not None:
            await self.rendezvous.arrive()
        if self.broken:
            raise ConnectionError("timeout")
        if key not in self.entries:
            raise KeyNotFoundError
        return SimpleNamespace(key=key, value=self.entries[key].encode(), operation=None,
                               revision=self.revisions.get(key, 1))

    @property
    def revisions(self) -> dict:
        return self.__dict__.setdefault("_revisions", {})

    async def create(self, key, value):
        from nats.js.errors import KeyWrongLastSequenceError

        if self.broken:
            raise ConnectionError("timeout")
        if key in self.entries:
            raise KeyWrongLastSequenceError
        return await self.update(key, value, last=None)

    async def update(self, key, value, last=None):
        from nats.js.errors import KeyWrongLastSequenceError

        if last is not None and self.revisions.get(key, 1) != last:
            raise KeyWrongLastSequenceError
        self.entries[key] = value.decode()
        self.revisions[key] = self.revisions.get(key, 1) + 1
        return self.revisions[key]


def finished_bucket(entries=None, complete=True, **options) -> FakeKeyValue:
    """The finished-tasks bucket: complete (refilled) unless told otherwise; `complete` may be
    the complete key's value."""
    entries = dict(entries or {})
    if complete:
        entries[ex.FINISHED_TASKS_COMPLETE_KEY] = BUCKETS_CREATED if complete is True else complete
    return FakeKeyValue(entries, **options)


def cancelled_bucket(entries=None, complete=True, **options) -> FakeKeyValue:
    """The cancelled-runs bucket: complete (refilled) unless told otherwise."""
    entries = dict(entries or {})
    if complete:
        entries[ex.CANCELLED_RUNS_COMPLETE_KEY] = BUCKETS_CREATED
    return FakeKeyValue(entries, **options)


class Rendezvous:
    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.all_here: asyncio.Event | None = None

    async def arrive(self) -> None:
        if self.all_here is None:
            self.all_here = asyncio.Event()
        self.arrived += 1
        if self.arrived == self.parties:
            self.all_here.set()
        await asyncio.wait_for(self.all_here.wait(), 1.0)


def make_executor(events: list, handlers=None, *, fail=False, ack_delay=0.0, ack_wait=30.0,
                  cancelled=None, finished=None) -> ex.Executor:
    """An executor over fakes: both buckets empty unless given."""
    executor = ex.Executor(FakeJetStream(events, fail, ack_delay), "python-executor@test",
                           ex.HANDLERS if handlers is None else handlers, ack_wait=ack_wait)
    executor.cancellations.kv = cancelled or cancelled_bucket()
    executor.finished.kv = finished or finished_bucket()
    return executor


def recording(events: list):
    """The uppercase handler, noting in `events` when it starts."""

    async def handler(attempt):
        events.append(("handler", attempt.number))
        return await ex.uppercase(attempt)

    return {"uppercase": handler}


class OneAttempt(unittest.TestCase):
    def attempt(self, data: bytes, delivered=1, **executor_args):
        events: list = []
        executor = make_executor(events, **executor_args)
        _run(executor.process("uppercase", FakeMessage(data, events, delivered)))
        self.assertEqual(executor.cancellations.in_flight, {}, "every attempt unregisters")
        return events

    def result(self, event, status=None) -> ex.TaskResult:
        self.assertEqual(event[0], "publish")
        self.assertEqual(event[1], "results.shout.run-1")
        result = ex.TaskResult.FromString(event[3])
        if status is not None:
            self.assertEqual(ex.status_name(result.status), status)
        return result

    @staticmethod
    def kinds(events) -> list[str]:
        """What happened, in order: results by their status, `dlq`, `ack`, `nak`, …"""
        out = []
        for event in events:
            if event[0] != "publish":
                out.append(event[0])
            elif event[1].startswith("dlq."):
                out.append("dlq")
            else:
                out.append(ex.status_name(ex.TaskResult.FromString(event[3]).status))
        return out

    def test_success_reports_the_start_then_the_result_then_acks(self) -> None:
        events = self.attempt(task_bytes({"text": "hello"}, result_token="token-1"))
        self.assertEqual(self.kinds(events), ["RUNNING", "SUCCEEDED", "ack"])
        result = self.result(events[1], "SUCCEEDED")
        self.assertEqual(events[1][2], {"Nats-Msg-Id": f"{TASK_ID}:1:SUCCEEDED"})
        self.assertEqual(ex.value_to_py(result.output), {"text": "HELLO"})
        self.assertEqual((result.run_id, result.activity_id, result.type), ("run-1", "act-1", "uppercase"))
        self.assertEqual((result.attempt, result.executor, result.retryable), (1, "python-executor@test", False))
        self.assertEqual((result.result_token, result.execution), ("token-1", ""))
        self.assertLessEqual(result.started_at.ToNanoseconds(), result.finished_at.ToNanoseconds())
        self.assertGreater(result.started_at.seconds, 0)

    def test_the_start_report(self) -> None:
        events = self.attempt(task_bytes({"text": "hello"}, result_token="token-1"))
        start = self.result(events[0], "RUNNING")
        outcome = self.result(events[1], "SUCCEEDED")
        execution = str(uuid.UUID(start.execution))  # a UUID
        self.assertEqual(events[0][2], {"Nats-Msg-Id": f"{TASK_ID}:1:RUNNING:{execution}"})
        self.assertEqual(
            (start.task_id, start.run_id, start.activity_id, start.type, start.attempt, start.executor),
            (TASK_ID, "run-1", "act-1", "uppercase", 1, "python-executor@test"),
        )
        self.assertEqual(start.result_token, "token-1")
        self.assertEqual(start.started_at, outcome.started_at, "the start of the attempt it reports")
        self.assertFalse(start.HasField("finished_at"))
        self.assertFalse(start.HasField("output"))
        self.assertEqual((start.error, start.retryable), ("", False))

    def test_every_start_has_an_execution_of_its_own(self) -> None:
        first = self.result(self.attempt(task_bytes({"text": "x"}))[0], "RUNNING")
        again = self.result(self.attempt(task_bytes({"text": "x"}))[0], "RUNNING")
        self.assertNotEqual(first.execution, again.execution)

    def test_the_task_runs_only_once_its_start_is_acked(self) -> None:
        # The fake stream acks a publish after 50 ms and records it then.
        events: list = []
        executor = make_executor(events, recording(events), ack_delay=0.05)
        _run(executor.process("uppercase", FakeMessage(task_bytes({"text": "x"}), events)))
        self.assertEqual(self.kinds(events), ["RUNNING", "handler", "SUCCEEDED", "ack"])

    def test_a_start_that_cannot_be_reported_is_not_run(self) -> None:
        events: list = []
        executor = make_executor(events, recording(events), fail=is_start)
        _run(executor.process("uppercase", FakeMessage(task_bytes({"text": "x"}), events)))
        self.assertEqual(events, [("nak", ex.Executor.SETTLE_RETRY)])
        self.assertEqual(executor.cancellations.in_flight, {})

    def test_tls_settings(self) -> None:
        self.assertIsNone(ex.tls_context({}))
        self.assertIsNotNone(ex.tls_context({"NATS_TLS": "true"}))
        with self.assertRaises(SystemExit) as refused:
            ex.tls_context({"NATS_CERT": "/some/client.pem"})
        self.assertIn("NATS_KEY", str(refused.exception))

    def test_the_reports_carry_the_tasks_trace_context(self) -> None:
        events: list = []
        executor = make_executor(events)
        message = FakeMessage(task_bytes({"text": "hello"}), events)
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        message.headers = {"Nats-Msg-Id": "original", "Traceparent": traceparent, "tracestate": "k=v"}
        _run(executor.process("uppercase", message))
        self.assertEqual(self.kinds(events), ["RUNNING", "SUCCEEDED", "ack"])
        for event in events[:2]:
            self.assertEqual(event[2]["traceparent"], traceparent)
            self.assertEqual(event[2]["tracestate"], "k=v")
        self.assertTrue(events[1][2]["Nats-Msg-Id"].endswith(":1:SUCCEEDED"))

    def test_missing_params_is_dead_at_once_with_a_dead_letter(self) -> None:
        data = task_bytes()
        events = self.attempt(data)
        self.assertEqual(self.kinds(events), ["RUNNING", "DEAD", "dlq", "ack"])
        result = self.result(events[1], "DEAD")
        self.assertIn("params.text is required", result.error)
        self.assertFalse(result.retryable)
        self.assertFalse(result.HasField("output"))
        _, subject, headers, payload = events[2]
        self.assertEqual(subject, "dlq.tasks.uppercase")
        self.assertEqual(payload, data, "the dead letter is the task message as it came")
        self.assertEqual(headers["Nats-Msg-Id"], "dlq:FACTORY_TASKS:7:0")
        self.assertEqual(headers["Taskfactory-Original-Subject"], "tasks.uppercase")
        self.assertEqual(headers["Taskfactory-Original-Sequence"], "7")
        self.assertEqual(headers["Taskfactory-Attempts"], "1")
        self.assertIn("params.text is required", headers["Taskfactory-Error"])

    def test_a_transient_failure_with_attempts_left_naks_with_the_backoff(self) -> None:
        retry = ex.TaskInstance().retry.__class__(max_attempts=3)
        retry.initial_backoff.FromMilliseconds(500)
        events = self.attempt(task_bytes({"text": "x", "failAttempts": 1}, retry=retry))
        self.assertEqual(self.kinds(events), ["RUNNING", "FAILED", "nak"])
        result = self.result(events[1], "FAILED")
        self.assertTrue(result.retryable)
        self.assertIn("simulated transient failure on attempt 1", result.error)
        self.assertTrue(0.4 <= events[2][1] <= 0.6, events[2])

    def test_the_last_attempt_is_dead(self) -> None:
        events = self.attempt(task_bytes({"text": "x", "failAttempts": 9}), delivered=3)
        self.assertEqual(self.kinds(events), ["RUNNING", "DEAD", "dlq", "ack"])
        self.assertEqual(self.result(events[0], "RUNNING").attempt, 3)
        self.assertEqual(self.result(events[1], "DEAD").attempt, 3)
        self.assertEqual(events[1][2]["Nats-Msg-Id"], f"{TASK_ID}:3:DEAD")
        self.assertEqual(events[2][2]["Taskfactory-Attempts"], "3")

    def test_a_redriven_task_counts_on_from_attempt_base(self) -> None:
        events = self.attempt(task_bytes({"text": "x"}, attempt_base=3))
        self.assertEqual(self.result(events[0], "RUNNING").attempt, 4)
        self.assertTrue(events[0][2]["Nats-Msg-Id"].startswith(f"{TASK_ID}:4:RUNNING:"))
        self.assertEqual(self.result(events[1], "SUCCEEDED").attempt, 4)
        self.assertEqual(events[1][2]["Nats-Msg-Id"], f"{TASK_ID}:4:SUCCEEDED")

    def test_the_timeout_is_a_transient_failure(self) -> None:
        timeout = ex.TaskInstance().timeout.__class__()
        timeout.FromMilliseconds(100)
        events = self.attempt(task_bytes({"text": "x", "sleepSeconds": 5}, timeout=timeout))
        result = self.result(events[1], "FAILED")
        self.assertEqual(result.error, "timed out after 0.1s")

    def test_a_long_task_sends_heartbeats(self) -> None:
        events = self.attempt(task_bytes({"text": "x", "sleepSeconds": 0.35}), ack_wait=0.3)
        kinds = self.kinds(events)
        self.assertGreaterEqual(kinds.count("in_progress"), 2, kinds)
        self.assertEqual(kinds[0], "RUNNING")
        self.assertEqual(kinds[-2:], ["SUCCEEDED", "ack"])

    def test_heartbeats_keep_the_task_while_its_start_report_waits(self) -> None:
        events = self.attempt(task_bytes({"text": "x"}), ack_wait=0.3, ack_delay=0.35)
        kinds = self.kinds(events)
        self.assertGreaterEqual(kinds[: kinds.index("RUNNING")].count("in_progress"), 2, kinds)

    def test_an_undecodable_message_is_dead_lettered_and_terminated(self) -> None:
        events = self.attempt(b"not protobuf")
        self.assertEqual(self.kinds(events), ["dlq", "term"])
        _, subject, headers, payload = events[0]
        self.assertEqual((subject, payload), ("dlq.tasks.uppercase", b"not protobuf"))
        self.assertEqual(headers["Nats-Msg-Id"], "dlq:FACTORY_TASKS:7:0")
        self.assertEqual(headers["Taskfactory-Original-Subject"], "tasks.uppercase")
        self.assertEqual(headers["Taskfactory-Original-Sequence"], "7")
        self.assertIn("not a TaskInstance", headers["Taskfactory-Error"])

    def test_a_task_without_id_is_dead_lettered(self) -> None:
        events = self.attempt(ex.TaskInstance(type="uppercase").SerializeToString())
        self.assertEqual(self.kinds(events), ["dlq", "term"])
        self.assertIn("no task_id", events[0][2]["Taskfactory-Error"])

    def test_no_ack_when_the_result_cannot_be_published(self) -> None:
        events = self.attempt(task_bytes({"text": "x"}), fail=lambda headers: not is_start(headers))
        self.assertEqual(self.kinds(events), ["RUNNING", "nak"])
        self.assertEqual(events[1], ("nak", ex.Executor.SETTLE_RETRY))

    def test_a_task_of_a_cancelled_run_is_not_run(self) -> None:
        events: list = []
        executor = make_executor(events, recording(events),
                                 cancelled=FakeKeyValue({"run-1": "cancelled: wrong batch"}))
        _run(executor.process("uppercase", FakeMessage(task_bytes({"text": "x"}), events)))
        self.assertEqual(self.kinds(events), ["CANCELLED", "ack"], "no start either")
        result = self.result(events[0])
        self.assertEqual(result.error, "cancelled: wrong batch")
        self.assertEqual(events[0][2]["Nats-Msg-Id"], f"{TASK_ID}:1:CANCELLED")

    def test_an_attempt_in_flight_stops_when_its_run_is_cancelled(self) -> None:
        events: list = []
        executor = make_executor(events)

        async def scenario():
            attempt = asyncio.create_task(
                executor.process("uppercase", FakeMessage(task_bytes({"text": "x", "sleepSeconds": 30}), events))
            )
            await asyncio.sleep(0.1)
            executor.cancellations.cancelled("run-1")  # what the watcher does on a put
            await asyncio.wait_for(attempt, 2)

        _run(scenario())
        self.assertEqual(self.kinds(events), ["RUNNING", "CANCELLED", "ack"])
        self.assertIn("cancelled while the task ran", self.result(events[1]).error)

    def test_when_cancellations_cannot_be_read_the_task_waits(self) -> None:
        events = self.attempt(task_bytes({"text": "x"}), cancelled=FakeKeyValue(broken=True))
        self.assertEqual(events, [("nak", ex.Executor.SETTLE_RETRY)])

    def test_a_finished_task_is_acked_without_running_or_reporting(self) -> None:
        for value in ("1", "3", " 2\n"):
            events: list = []
            executor = make_executor(events, recording(events), finished=finished_bucket({TASK_KEY: value}))
            _run(executor.process("uppercase", FakeMessage(task_bytes({"text": "x"}), events, delivered=2)))
            self.assertEqual(events, [("ack",)], f"finished by attempt {value!r}")
            self.assertEqual(executor.cancellations.in_flight, {})

    def test_a_finished_task_is_not_run_even_in_a_cancelled_run(self) -> None:
        events = self.attempt(
            task_bytes({"text": "x"}),
            cancelled=FakeKeyValue({"run-1": "cancelled"}),
            finished=finished_bucket({TASK_KEY: "1"}),
        )
        self.assertEqual(events, [("ack",)])

    def test_a_redrive_after_the_finishing_attempt_runs(self) -> None:
        # RetryTask after attempt 3 decided the task: the new series starts at attempt_base 3.
        events = self.attempt(task_bytes({"text": "x"}, attempt_base=3), finished=finished_bucket({TASK_KEY: "3"}))
        self.assertEqual(self.kinds(events), ["RUNNING", "SUCCEEDED", "ack"])
        self.assertEqual(self.result(events[1]).attempt, 4)
        # ...but a message of that series, once it was decided in turn, does not.
        events = self.attempt(task_bytes({"text": "x"}, attempt_base=3), finished=finished_bucket({TASK_KEY: "4"}))
        self.assertEqual(events, [("ack",)])

    def test_a_finished_value_that_is_no_attempt_number_finishes_nothing(self) -> None:
        for value in ("", "done", "-1", "1.0", "4294967296"):
            events = self.attempt(task_bytes({"text": "x"}), finished=finished_bucket({TASK_KEY: value}))
            self.assertEqual(self.kinds(events), ["RUNNING", "SUCCEEDED", "ack"], repr(value))

    def test_when_finished_tasks_cannot_be_read_the_task_waits(self) -> None:
        events: list = []
        executor = make_executor(events, recording(events), finished=finished_bucket(broken=True))
        _run(executor.process("uppercase", FakeMessage(task_bytes({"text": "x"}), events)))
        self.assertEqual(events, [("nak", ex.Executor.SETTLE_RETRY)])
        self.assertEqual(executor.cancellations.in_flight, {})

    def test_both_buckets_are_read_at_once(self) -> None:
        # Each read waits until the other one has begun: read one after the other, they fail.
        rendezvous = Rendezvous(2)
        events = self.attempt(
            task_bytes({"text": "x"}),
            cancelled=cancelled_bucket(rendezvous=rendezvous),
            finished=finished_bucket(rendezvous=rendezvous),
        )
        self.assertEqual(self.kinds(events), ["RUNNING", "SUCCEEDED", "ack"])

    def test_a_final_result_marks_the_task_finished_before_the_ack(self) -> None:
        finished = finished_bucket()
        events = self.attempt(task_bytes({"text": "x"}), delivered=2, finished=finished)
        self.assertEqual(self.kinds(events), ["RUNNING", "SUCCEEDED", "ack"])
        self.assertEqual(finished.entries[TASK_KEY], "2")
        finished = finished_bucket()
        events = self.attempt(task_bytes({}), finished=finished)
        self.assertEqual(self.kinds(events), ["RUNNING", "DEAD", "dlq", "ack"])
        self.assertEqual(finished.entries[TASK_KEY], "1")

    def test_a_failed_attempt_marks_nothing(self) -> None:
        finished = finished_bucket()
        events = self.attempt(task_bytes({"text": "x", "failAttempts": 1}), finished=finished)
        self.assertEqual(self.kinds(events), ["RUNNING", "FAILED", "nak"])
        self.assertNotIn(TASK_KEY, finished.entries)

    def test_a_task_is_not_run_while_the_finished_tasks_bucket_is_refilled(self) -> None:
        events = self.attempt(task_bytes({"text": "x"}), finished=finished_bucket(complete=False))
        self.assertEqual(events, [("nak", ex.Executor.UNPROVEN_RETRY)])
        # ...but a task its entry finishes is acked as ever.
        events = self.attempt(task_bytes({"text": "x"}), finished=finished_bucket({TASK_KEY: "1"}, complete=False))
        self.assertEqual(events, [("ack",)])

    def test_a_complete_key_naming_another_bucket_proves_nothing(self) -> None:
        for value in ("2026-12-06T00:00:00.124Z", "yes", ""):
            events = self.attempt(task_bytes({"text": "x"}), finished=finished_bucket(complete=value))
            self.assertEqual(events, [("nak", ex.Executor.UNPROVEN_RETRY)], value)
        # The same instant in another spelling names the bucket.
        events = self.attempt(task_bytes({"text": "x"}),
                              finished=finished_bucket(complete="2026-12-06T01:00:00.123456+01:00"))
        self.assertEqual(self.kinds(events), ["RUNNING", "SUCCEEDED", "ack"])

    def test_a_task_is_not_run_while_the_cancelled_runs_bucket_is_refilled(self) -> None:
        events = self.attempt(task_bytes({"text": "x"}), cancelled=cancelled_bucket(complete=False))
        self.assertEqual(events, [("nak", ex.Executor.UNPROVEN_RETRY)])
        # ...but a run it names is cancelled as ever.
        events = self.attempt(task_bytes({"text": "x"}),
                              cancelled=cancelled_bucket({"run-1": "stop"}, complete=False))
        self.assertEqual(self.kinds(events), ["CANCELLED", "ack"])

    def test_output_that_is_not_json_is_dead(self) -> None:
        async def bad(attempt):
            return {"when": object()}

        events: list = []
        executor = make_executor(events, {"uppercase": bad})
        _run(executor.process("uppercase", FakeMessage(task_bytes({}), events)))
        result = self.result(events[1], "DEAD")
        self.assertIn("not JSON", result.error)


class FinishedTasks(unittest.TestCase):
    def test_the_rule_of_the_built_in_executor(self) -> None:
        # services/taskfactory-model/src/results.rs: already_finished's tests.
        self.assertTrue(ex.already_finished(1, 0))
        self.assertTrue(ex.already_finished(3, 0))
        self.assertFalse(ex.already_finished(3, 3), "RetryTask after attempt 3")
        self.assertTrue(ex.already_finished(4, 3))
        self.assertFalse(ex.already_finished(0, 0))

    def test_values(self) -> None:
        for value, expected in [
            (b"3", 3), (b" 12\n", 12), (b"+2", 2), (b"0", 0), (b"4294967295", 4294967295),
            (b"", None), (None, None), (b"x", None), (b"-1", None), (b"1_0", None), (b"1.5", None),
            (b"4294967296", None), ("٣".encode(), None), (b"\xff", None),
        ]:
            self.assertEqual(ex.parse_finished_by(value), expected, repr(value))

    def test_marking_creates_the_entry_and_only_ever_raises_it(self) -> None:
        finished = ex.FinishedTasks(js=None)
        finished.kv = FakeKeyValue()
        _run(finished.mark("t1", 2))
        self.assertEqual(finished.kv.entries["t1"], "2")
        _run(finished.mark("t1", 1))
        self.assertEqual(finished.kv.entries["t1"], "2", "never lowered")
        _run(finished.mark("t1", 5))
        self.assertEqual(finished.kv.entries["t1"], "5")

    def test_a_key_no_task_can_have_is_not_finished(self) -> None:
        from nats.js.errors import InvalidKeyError

        class Refusing:
            async def get(self, key):
                raise InvalidKeyError

        finished = ex.FinishedTasks(js=None)
        finished.kv = Refusing()
        self.assertIsNone(_run(finished.finished_by("no such key")))


class CommandLine(unittest.TestCase):
    def test_running_after_is_gone(self) -> None:
        # Every start is reported before the task runs; there is nothing left to configure.
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            ex.parse_args(["--running-after", "1"])


if __name__ == "__main__":
    unittest.main()
