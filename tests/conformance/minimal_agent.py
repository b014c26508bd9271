"""A minimal edgefarm agent written from the .proto contract alone.

It imports only the Python standard library, ``grpc`` and the stubs generated from
``protos/`` (``protos.edgefarm.v1.*_pb2`` / ``*_pb2_grpc``): nothing of the agent,
coordinator, edgefarm or results packages. It is run in an isolated interpreter
(``python -I -S``) with the generated ``protos`` package beside this file and the
folders holding ``grpc`` and ``google.protobuf`` given with ``--site-packages``.

What it does, as agent.proto and common.proto describe:

- registers with the fleet token the first time and stores the credential it is
  issued in ``<work-dir>/credential`` (mode 0600); later registrations present the
  credential and no token;
- opens the Connect stream, sends Hello with the session, heartbeats every
  ``heartbeat_interval_s`` naming the task and lease in hand;
- takes assignments of backend ``noop`` (anything else is answered ok=false,
  ``backend_unavailable``): fetches the model and eval data with FetchArtifact
  (resuming from the partial file's size), checks their sha256, and measures each
  trial in a fresh process: load = reading the model file's size, each timed iteration
  a call that returns at once, the loop as MeasureSettings say; in the first trial it
  scores the noop predictor (one-hot of the argmax of the first 10 input features) on
  a classification eval file, read with zipfile and a small .npy reader; an LLM eval
  file (array ``kind``) is not scored (accuracy left empty);
- sends one TaskResult per assignment within RegisterResponse.limits, keeps it until
  acknowledged, re-sends it after a reconnect (jittered backoff, new Register and
  Hello), and treats UNAUTHENTICATED as final (exit code 6).

Exit codes: 0 after ``--results`` stored results, an idle period of ``--idle-exit``
seconds, or a successful ``--register-only``; 5 protocol version refused
(FAILED_PRECONDITION); 6 refused identity (UNAUTHENTICATED); 2 usage. ``--report FILE``
writes what happened (agent id, acks, modules loaded) as JSON at exit.

``python -I -S minimal_agent.py trial REQUEST_JSON`` is the measuring child (internal).
"""

from __future__ import annotations

import argparse
import ast
import gc
import hashlib
import json
import math
import os
import platform
import queue
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROTOCOL_VERSION = 2  # edgefarm.PROTOCOL_VERSION, as agent.proto states
BACKEND = "noop"
BACKEND_VERSION = "conformance-1"
NUM_CLASSES = 10  # the noop predictor's classes
REGISTER_TIMEOUT_S = 10.0
FETCH_TRIES = 3
EXIT_VERSION, EXIT_AUTH = 5, 6
# Protocol-2 limits, used where RegisterResponse.limits states 0 (agent.proto).
DEFAULT_LIMITS = {
    "max_message_bytes": 25_165_824,
    "max_trials": 100,
    "max_samples_per_trial": 1_000_000,
    "max_samples_per_result": 2_000_000,
    "max_string_bytes": 65_536,
    "max_map_entries": 256,
    "max_example_outcomes": 1_000_000,
}


class TaskFailed(Exception):
    """A task failure with its documented error_kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ----- the measuring child (standard library only) ------------------------------------


def _proc_status_kib(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    """Resident set size now (Linux; 0 elsewhere)."""
    return _proc_status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process."""
    peak = _proc_status_kib("VmHWM") * 1024
    if peak:
        return peak
    try:
        import resource
    except ImportError:
        return 0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def host_busy_s() -> float | None:
    """Busy CPU seconds of the whole host (user nice system irq softirq steal), Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    ticks = [int(x) for x in fields[1:9]]
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def parse_npy(data: bytes) -> tuple[str, tuple[int, ...], Any]:
    """(dtype descr, shape, values as a flat list or a str) of one .npy file."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    if data[6] == 1:
        (length,), start = struct.unpack_from("<H", data, 8), 10
    else:
        (length,), start = struct.unpack_from("<I", data, 8), 12
    header = ast.literal_eval(data[start : start + length].decode("latin1"))
    descr, shape = str(header["descr"]), tuple(int(d) for d in header["shape"])
    if header.get("fortran_order") and len(shape) > 1:
        raise ValueError("Fortran-ordered arrays are not read")
    body = data[start + length :]
    count = math.prod(shape)
    if descr[1:2] == "U":  # unicode: UTF-32 code units
        return descr, shape, body.decode("utf-32-le" if descr[0] != ">" else "utf-32-be")
    codes = {"f4": "f", "f8": "d", "i8": "q", "i4": "i", "i2": "h", "u1": "B", "i1": "b"}
    code = codes.get(descr[1:])
    if code is None or descr[0] not in "<|=":
        raise ValueError(f"dtype {descr} is not read")
    return descr, shape, list(struct.unpack_from(f"<{count}{code}", body))


def read_npz(path: Path) -> dict[str, tuple[str, tuple[int, ...], Any]]:
    """Every array of an .npz file."""
    with zipfile.ZipFile(path) as archive:
        return {
            name[: -len(".npy")]: parse_npy(archive.read(name))
            for name in archive.namelist()
            if name.endswith(".npy")
        }


def argmax(values: list[float]) -> int:
    """Index of the first largest value."""
    best = 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best = i
    return best


def noop_accuracy(eval_path: Path) -> tuple[dict[str, float], bytes]:
    """The noop predictor scored on a classification eval file (agent.proto's keys).

    An LLM reference (array ``kind``) is not scored: ({}, b"")."""
    with zipfile.ZipFile(eval_path) as archive:
        if "kind.npy" in archive.namelist():
            return {}, b""
    arrays = read_npz(eval_path)
    missing = [a for a in ("inputs", "labels", "reference") if a not in arrays]
    if missing:
        raise TaskFailed("artifact_error", f"eval data lacks array(s): {', '.join(missing)}")
    _, in_shape, inputs = arrays["inputs"]
    _, (n,), labels = arrays["labels"]
    _, ref_shape, reference = arrays["reference"]
    features = math.prod(in_shape[1:])
    classes = ref_shape[1] if len(ref_shape) == 2 else 0
    if n == 0 or in_shape[0] != n or ref_shape[0] != n:
        raise TaskFailed("artifact_error", "eval data: inputs, labels and reference differ")
    if classes != NUM_CLASSES:
        raise TaskFailed("task_error", f"reference has {classes} classes, noop predicts 10")
    top1 = agree = ref_top1 = 0
    max_diff = 0.0
    outcomes = bytearray()
    for i in range(n):
        first = inputs[i * features : i * features + min(NUM_CLASSES, features)]
        predicted = argmax(first)
        ref_row = reference[i * classes : (i + 1) * classes]
        expected = argmax(ref_row)
        for c, r in enumerate(ref_row):
            max_diff = max(max_diff, abs((1.0 if c == predicted else 0.0) - r))
        correct = predicted == labels[i]
        top1 += correct
        agree += predicted == expected
        ref_top1 += expected == labels[i]
        outcomes.append(1 if correct else 0)
    accuracy = {
        "top1": top1 / n,
        "agreement": agree / n,
        "reference_top1": ref_top1 / n,
        "max_abs_diff": max_diff,
        "examples": float(n),
    }
    return accuracy, bytes(outcomes)


def run_trial(request: dict[str, Any]) -> dict[str, Any]:
    """One trial of the noop backend, in this (fresh) process."""
    s = request["settings"]
    model = Path(request["model_path"])
    rss_before = rss_bytes()
    started = time.perf_counter()
    size = model.stat().st_size  # noop's load: the model file's size
    load_time_s = time.perf_counter() - started
    rss_after = rss_bytes()
    if size == 0:
        raise TaskFailed("model_load_error", f"model file is empty: {model.name}")

    def run() -> None:  # noop's iteration: returns at once, whatever the input
        return None

    for _ in range(s["warmup_iterations"]):
        run()
    max_iterations = request["max_iterations"]
    clock = time.perf_counter_ns
    samples: list[int] = []
    busy0, own0 = host_busy_s(), own_cpu_s()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        min_end = start + int(s["min_duration_s"] * 1e9)
        max_end = start + int(s["max_duration_s"] * 1e9)
        stopped_by = ""
        while True:
            t0 = clock()
            run()
            t1 = clock()
            samples.append(t1 - t0)
            if len(samples) >= s["min_iterations"] and t1 >= min_end:
                break
            if len(samples) >= max_iterations:
                stopped_by = f"max_iterations={max_iterations}"
                break
            if t1 >= max_end:
                stopped_by = f"max_duration_s={s['max_duration_s']:g}"
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    duration_s = (t1 - start) / 1e9
    busy1, own1 = host_busy_s(), own_cpu_s()
    metrics: dict[str, float] = {}
    if busy0 is not None and busy1 is not None and duration_s > 0:
        metrics["host_other_cpu_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / duration_s
    reasons = []
    if stopped_by:
        if len(samples) < s["min_iterations"]:
            reasons.append(f"min_iterations={s['min_iterations']} not met ({len(samples)})")
        if t1 < min_end:
            reasons.append(f"min_duration_s={s['min_duration_s']:g} not met")
        reasons = [f"stopped at {stopped_by}: " + "; ".join(reasons)]
    limit = s["max_other_cpu_cores"]
    if limit < 0:  # -1: a quarter of the host's logical cores
        limit = 0.25 * (os.cpu_count() or 1)
    other = metrics.get("host_other_cpu_cores", 0.0)
    if limit > 0 and other > limit and duration_s >= 0.2:
        reasons.append(f"host busy: other processes used {other:.2f} cores > {limit:g}")
    trial = {
        "samples_ms": [ns / 1e6 for ns in samples],
        "warmup_iterations": s["warmup_iterations"],
        "duration_s": duration_s,
        "load_time_s": load_time_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "load_rss_delta_bytes": rss_after - rss_before,
        "valid": not reasons,
        "invalid_reason": "; ".join(reasons),
        "metrics": metrics,
    }
    accuracy: dict[str, float] = {}
    outcomes = b""
    if request["eval_path"] and request["compute_accuracy"]:
        accuracy, outcomes = noop_accuracy(Path(request["eval_path"]))
    return {
        "ok": True,
        "trial": trial,
        "accuracy": accuracy,
        "example_outcomes": outcomes.hex(),
        "model_size_bytes": size,
    }


def trial_main(request_path: str) -> int:
    """The measuring child: one trial, the result as JSON on stdout."""
    try:
        result = run_trial(json.loads(Path(request_path).read_text()))
    except TaskFailed as err:
        result = {"ok": False, "error_kind": err.kind, "error_message": str(err)}
    except Exception as err:
        result = {"ok": False, "error_kind": "task_error", "error_message": repr(err)}
    print(json.dumps(result))
    return 0


# ----- the agent -----------------------------------------------------------------------


def _bootstrap(site_dirs: list[str]) -> None:
    """The generated stubs beside this file first; then grpc's and protobuf's folders."""
    sys.path.insert(0, str(HERE))
    for folder in site_dirs:
        if folder not in sys.path:
            sys.path.append(folder)


class MinimalAgent:
    """One agent: register, stream, measure noop tasks, report."""

    def __init__(self, args: argparse.Namespace) -> None:
        import grpc

        from protos.edgefarm.v1 import agent_pb2, agent_pb2_grpc, common_pb2

        self.grpc, self.pb, self.common = grpc, agent_pb2, common_pb2
        self.args = args
        self.work_dir = Path(args.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.credential_path = self.work_dir / "credential"
        channel = grpc.insecure_channel(
            args.coordinator, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.stub = agent_pb2_grpc.AgentGatewayStub(channel)
        self.lock = threading.Lock()
        self.agent_id = ""
        self.session_token = ""
        self.limits = dict(DEFAULT_LIMITS)
        self.heartbeat_s = 2.0
        self.current: tuple[str, str] = ("", "")  # (task_id, lease_id) in hand
        self.cancelled: set[str] = set()  # lease ids cancelled by the coordinator
        self.unacked: dict[tuple[str, int], Any] = {}
        self.assignments: queue.Queue[Any] = queue.Queue()
        self.outgoing: queue.Queue[Any] = queue.Queue()
        self.stop = threading.Event()
        self.last_activity = time.monotonic()
        self.report: dict[str, Any] = {
            "accepted": 0,
            "duplicates": 0,
            "refused": [],
            "registrations": 0,
            "enrolled": False,
            "assignments": 0,
        }

    # --- identity ---

    def register(self) -> Any:
        """Register (enrolling with the fleet token the first time); keep the credential.

        A refused credential leads to one enrolment try with the fleet token (a
        coordinator that never saw this identity enrols it again; one that did refuses)."""
        credential = ""
        if self.credential_path.is_file():
            credential = self.credential_path.read_text().strip()
        try:
            reply = self.stub.Register(
                self.register_request(credential), timeout=REGISTER_TIMEOUT_S
            )
        except self.grpc.RpcError as error:
            if not credential or error.code() != self.grpc.StatusCode.UNAUTHENTICATED:
                raise
            self.log(f"credential refused ({error.details()}); enrolling with the fleet token")
            reply = self.stub.Register(self.register_request(""), timeout=REGISTER_TIMEOUT_S)
        return self._keep(reply)

    def register_request(self, credential: str) -> Any:
        """The fleet token only when there is no credential to present."""
        return self.pb.RegisterRequest(
            token="" if credential else self.args.token,
            agent_version=BACKEND_VERSION,
            protocol_version=PROTOCOL_VERSION,
            name=self.args.name,
            labels=dict(kv.split("=", 1) for kv in self.args.label),
            capabilities=self.capabilities(),
            credential=credential,
        )

    def _keep(self, reply: Any) -> Any:
        """Store a newly issued credential (0600); take the session, tunables and limits."""
        if reply.credential:
            tmp = self.credential_path.with_name("credential.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(reply.credential)
            os.replace(tmp, self.credential_path)
            self.report["enrolled"] = True
        with self.lock:
            self.agent_id, self.session_token = reply.agent_id, reply.session_token
        self.heartbeat_s = reply.heartbeat_interval_s or 2.0
        for key in DEFAULT_LIMITS:
            stated = getattr(reply.limits, key)
            self.limits[key] = stated or DEFAULT_LIMITS[key]
        self.report["registrations"] += 1
        self.report["agent_id"] = reply.agent_id
        self.report["limits"] = dict(self.limits)
        return reply

    def capabilities(self) -> Any:
        host = socket.gethostname()
        device_id = self.args.device_id or "conf-" + hashlib.sha256(host.encode()).hexdigest()[:16]
        return self.common.DeviceCapabilities(
            device_id=device_id,
            hostname=host,
            os=platform.system(),
            os_release=platform.release(),
            arch=platform.machine(),
            logical_cores=os.cpu_count() or 1,
            backends={BACKEND: BACKEND_VERSION},
            python_version=platform.python_version(),
        )

    # --- the stream ---

    def run(self) -> int:
        """Serve until told to stop; the exit code."""
        grpc = self.grpc
        failures = 0
        worker = threading.Thread(target=self.work, daemon=True)
        worker.start()
        threading.Thread(target=self.watch_idle, daemon=True).start()
        while not self.stop.is_set():
            try:
                self.register()
                if self.args.register_only:
                    return 0
                failures = 0
                self.session()
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    self.report["final"] = f"UNAUTHENTICATED: {error.details()}"
                    return EXIT_AUTH
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    self.report["final"] = f"FAILED_PRECONDITION: {error.details()}"
                    return EXIT_VERSION
                if self.stop.is_set():
                    break
                failures += 1
                delay = random.uniform(0.125, min(30.0, 0.5 * 2**failures))
                self.log(f"connection lost ({code.name}); reconnecting in {delay:.1f}s")
                self.stop.wait(delay)
        return 0

    def session(self) -> None:
        """One Connect stream: Hello, re-sent results, heartbeats; handle what comes down."""
        pb = self.pb
        with self.lock:
            hello = pb.AgentMessage(
                hello=pb.Hello(agent_id=self.agent_id, session_token=self.session_token)
            )
            resend = list(self.unacked.values())
        outgoing: queue.Queue[Any] = queue.Queue()
        self.outgoing = outgoing
        for result in resend:
            outgoing.put(pb.AgentMessage(result=result))
        ended = threading.Event()

        def requests() -> Any:
            yield hello
            while True:
                message = outgoing.get()
                if message is None:
                    return
                yield message

        def heartbeats() -> None:
            while True:
                task_id, lease_id = self.current
                beat = pb.Heartbeat(task_id=task_id, lease_id=lease_id)
                outgoing.put(pb.AgentMessage(heartbeat=beat))
                if ended.wait(self.heartbeat_s):
                    return

        call = self.stub.Connect(requests())
        self.call = call
        beater = threading.Thread(target=heartbeats, daemon=True)
        beater.start()
        try:
            for message in call:
                self.handle(message)
                if self.stop.is_set():
                    break
        finally:
            ended.set()
            outgoing.put(None)
            call.cancel()
            beater.join()

    def handle(self, message: Any) -> None:
        kind = message.WhichOneof("body")
        self.last_activity = time.monotonic()
        if kind == "assignment":
            self.report["assignments"] += 1
            self.assignments.put(message.assignment)
        elif kind == "ack":
            ack = message.ack
            with self.lock:
                self.unacked.pop((ack.task_id, ack.attempt), None)
            if ack.accepted:
                self.report["accepted"] += 1
                self.report["duplicates"] += int(ack.duplicate)
            else:
                self.report["refused"].append(ack.reason)
                self.log(f"result for {ack.task_id} refused: {ack.reason}")
            if self.args.results and self.report["accepted"] >= self.args.results:
                self.stop.set()
        elif kind == "cancel":
            with self.lock:
                self.cancelled.add(message.cancel.lease_id)

    def watch_idle(self) -> None:
        """Stop after --idle-exit seconds without assignments or pending results."""
        while not self.stop.wait(0.2):
            with self.lock:
                busy = bool(self.unacked) or self.current != ("", "")
            if busy or not self.assignments.empty():
                self.last_activity = time.monotonic()
            elif time.monotonic() - self.last_activity > self.args.idle_exit:
                self.stop.set()
                call = getattr(self, "call", None)
                if call is not None:
                    call.cancel()

    # --- work ---

    def work(self) -> None:
        while True:
            assignment = self.assignments.get()
            with self.lock:
                self.current = (assignment.task_id, assignment.lease_id)
            try:
                result = self.execute(assignment)
            finally:
                with self.lock:
                    self.current = ("", "")
            with self.lock:
                if assignment.lease_id in self.cancelled:
                    continue  # cancelled: send nothing
                self.unacked[(result.task_id, result.attempt)] = result
            self.outgoing.put(self.pb.AgentMessage(result=result))

    def execute(self, a: Any) -> Any:
        result = self.common.TaskResult(
            task_id=a.task_id,
            attempt=a.attempt,
            lease_id=a.lease_id,
            batch_size=a.settings.batch_size,
            backend_version=BACKEND_VERSION,
        )
        try:
            self.check(a)
            model = self.fetch(a.artifact)
            eval_path = self.fetch(a.eval_data) if a.HasField("eval_data") else None
            trials = self.measure(a, model, eval_path)
        except TaskFailed as failure:
            result.ok = False
            result.error_kind = failure.kind
            result.error_message = self.clip(str(failure).splitlines()[0] if str(failure) else "")
            return result
        result.ok = True
        first = trials[0]
        for t in trials:
            trial = t["trial"]
            result.trials.add(
                samples_ms=trial["samples_ms"],
                warmup_iterations=trial["warmup_iterations"],
                duration_s=trial["duration_s"],
                load_time_s=trial["load_time_s"],
                peak_rss_bytes=trial["peak_rss_bytes"],
                load_rss_delta_bytes=trial["load_rss_delta_bytes"],
                valid=trial["valid"],
                invalid_reason=self.clip(trial["invalid_reason"]),
                metrics=trial["metrics"],
            )
        result.accuracy.update(first["accuracy"])
        outcomes = bytes.fromhex(first["example_outcomes"])
        if len(outcomes) <= self.limits["max_example_outcomes"]:
            result.example_outcomes = outcomes
        result.model_size_bytes = first["model_size_bytes"]
        result.environment.update(
            {
                "agent": "conformance",
                "python": platform.python_version(),
                "platform": platform.platform(),
                "threads": str(a.settings.threads),
                "batch_size": str(a.settings.batch_size),
            }
        )
        return result

    def clip(self, text: str) -> str:
        limit = self.limits["max_string_bytes"]
        return text.encode()[:limit].decode("utf-8", "ignore")

    def check(self, a: Any) -> None:
        if a.backend != BACKEND:
            raise TaskFailed("backend_unavailable", f"this agent has no backend {a.backend!r}")
        if a.options:
            raise TaskFailed(
                "task_error", f"unknown noop option(s): {', '.join(sorted(a.options))}"
            )
        s = a.settings
        for name in ("min_iterations", "max_iterations", "trials", "threads", "batch_size"):
            if getattr(s, name) == 0:
                raise TaskFailed("task_error", f"settings.{name} is 0")
        for name in ("min_duration_s", "max_duration_s", "timeout_s"):
            if not getattr(s, name) > 0:
                raise TaskFailed("task_error", f"settings.{name} must be > 0")
        if s.trials > self.limits["max_trials"]:
            raise TaskFailed("task_error", f"{s.trials} trials exceed the protocol's limit")

    def fetch(self, ref: Any) -> Path:
        """Download an artifact (resuming a partial one) and check its sha256."""
        grpc = self.grpc
        folder = self.work_dir / "artifacts"
        folder.mkdir(exist_ok=True)
        final = folder / ref.sha256
        if final.is_file() and final.stat().st_size == ref.size_bytes:
            return final
        part = folder / (ref.sha256 + ".part")
        for attempt in range(FETCH_TRIES):
            offset = part.stat().st_size if part.exists() else 0
            if offset > ref.size_bytes:
                part.unlink()
                offset = 0
            with self.lock:
                request = self.pb.FetchArtifactRequest(
                    agent_id=self.agent_id,
                    session_token=self.session_token,
                    sha256=ref.sha256,
                    offset=offset,
                )
            try:
                with part.open("ab") as out:
                    for chunk in self.stub.FetchArtifact(request, timeout=300):
                        if chunk.offset != out.tell():
                            raise TaskFailed("artifact_error", "chunk out of order")
                        out.write(chunk.data)
                break
            except grpc.RpcError as error:
                code = error.code()
                if code in (
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    raise TaskFailed("artifact_error", f"{ref.name}: {error.details()}") from None
                self.log(f"fetching {ref.name} failed ({code.name}), try {attempt + 1}")
                time.sleep(1.0)
        else:
            raise TaskFailed("artifact_error", f"could not download {ref.name}")
        digest = hashlib.sha256()
        with part.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != ref.sha256:
            part.unlink()
            raise TaskFailed("artifact_error", f"{ref.name}: sha256 mismatch after download")
        os.replace(part, final)
        return final

    def measure(self, a: Any, model: Path, eval_path: Path | None) -> list[dict[str, Any]]:
        """settings.trials trials, each in a fresh process; accuracy in the first."""
        s = a.settings
        # Never more samples than the limits allow (a capped trial is reported invalid).
        max_iterations = min(
            s.max_iterations,
            self.limits["max_samples_per_trial"],
            self.limits["max_samples_per_result"] // s.trials,
        )
        settings = {
            "warmup_iterations": s.warmup_iterations,
            "min_iterations": s.min_iterations,
            "min_duration_s": s.min_duration_s,
            "max_duration_s": s.max_duration_s,
            "max_other_cpu_cores": s.max_other_cpu_cores,
        }
        out = []
        for index in range(s.trials):
            if a.lease_id in self.cancelled:
                raise TaskFailed("task_error", "cancelled")
            request = {
                "model_path": str(model),
                "eval_path": str(eval_path) if eval_path else None,
                "compute_accuracy": index == 0 and not s.skip_evaluation,
                "settings": settings,
                "max_iterations": max_iterations,
            }
            path = self.work_dir / "trial-request.json"
            path.write_text(json.dumps(request))
            env = {**os.environ, "OMP_NUM_THREADS": str(s.threads)}
            try:
                proc = subprocess.run(
                    [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "trial", str(path)],
                    capture_output=True,
                    text=True,
                    timeout=s.timeout_s,
                    env=env,
                )
            except subprocess.TimeoutExpired:
                raise TaskFailed(
                    "timeout", f"trial {index + 1} ran past {s.timeout_s:g} s and was killed"
                ) from None
            try:
                result = json.loads(proc.stdout)
            except ValueError:
                raise TaskFailed(
                    "backend_crash", f"trial {index + 1} exited {proc.returncode} without a result"
                ) from None
            if not result["ok"]:
                raise TaskFailed(result["error_kind"], result["error_message"])
            out.append(result)
            progress = self.pb.TaskProgress(
                task_id=a.task_id,
                lease_id=a.lease_id,
                phase="measuring",
                trial=index + 1,
                trials=s.trials,
            )
            self.outgoing.put(self.pb.AgentMessage(progress=progress))
        return out

    def log(self, text: str) -> None:
        print(f"minimal-agent: {text}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["trial"] and len(argv) == 2:
        return trial_main(argv[1])
    parser = argparse.ArgumentParser(description="edgefarm conformance agent")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--token", default="", help="the fleet's enrolment secret")
    parser.add_argument("--name", required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--device-id", default="")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE")
    parser.add_argument("--site-packages", action="append", default=[])
    parser.add_argument("--results", type=int, default=0, help="exit after N stored results")
    parser.add_argument("--idle-exit", type=float, default=300.0, help="exit when idle (s)")
    parser.add_argument("--register-only", action="store_true")
    parser.add_argument("--report", default="")
    args = parser.parse_args(argv)
    _bootstrap(args.site_packages)
    agent = MinimalAgent(args)
    code = 0
    try:
        code = agent.run()
    finally:
        agent.stop.set()
        if args.report:
            import protos

            agent.report["exit_code"] = code
            agent.report["protos_file"] = str(Path(protos.__file__ or "").resolve())
            agent.report["modules"] = sorted(sys.modules)
            Path(args.report).write_text(json.dumps(agent.report, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
