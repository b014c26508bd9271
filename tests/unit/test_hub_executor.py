"""Hub jobs end to end against the TEST DOUBLE of qai_hub: the executor, its journal,
re-attaching after an interruption, rate limits and typed failures."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from pathlib import Path

import pytest

import tests.doubles.qai_hub as double
import tests.doubles.qai_hub.client as double_client
from agent.hub.api import HubApi, hub_api
from agent.hub.config import HubConfig
from agent.hub.devices import HubDevice, select_devices
from agent.hub.executor import HubExecutor
from agent.hub.jobs import HubJobs, HubSettings
from agent.hub.journal import SUBMITTED, Journal, JournalEntry
from agent.runner import TrialsReport
from coordinator.conversion.hub_inputs import build_hub_inputs
from coordinator.models.digits import build_digits_model
from edgefarm.domain import ArtifactRef, Assignment, MeasureSettings
from edgefarm.errors import HubJobFailed, UnsupportedScheme

pytest.importorskip("onnxruntime", reason="the double runs models with onnxruntime")
FAST = HubSettings(poll_interval_s=0.02, backoff_base_s=0.001, backoff_cap_s=0.01)
SETTINGS = MeasureSettings(min_iterations=20)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The digit classifier and its hub inputs file (calibration + eval set)."""
    folder = tmp_path_factory.mktemp("digits")
    bundle = build_digits_model(folder, seed=0, hidden_layers=(16,))
    data, _ = build_hub_inputs(
        bundle.model_path,
        bundle.eval_path.read_bytes(),
        bundle.calibration_path.read_bytes(),
    )
    # as in the agent's artifact cache: files named by their sha256 only
    cached = [
        folder / hashlib.sha256(b).hexdigest() for b in (bundle.model_path.read_bytes(), data)
    ]
    cached[0].write_bytes(bundle.model_path.read_bytes())
    cached[1].write_bytes(data)
    return cached[0], cached[1]


@pytest.fixture()
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(double.STATE_ENV, str(tmp_path / "state"))
    return tmp_path / "state"


@pytest.fixture()
def api(state: Path) -> HubApi:
    return hub_api(double, double_client, HubConfig(state / "x.ini", "test", "token"))


def _ref(path: Path) -> ArtifactRef:
    data = path.read_bytes()
    return ArtifactRef(hashlib.sha256(data).hexdigest(), len(data), path.name)


def _assignment(files: tuple[Path, Path], scheme: str, campaign: str = "c-1") -> Assignment:
    model, inputs = files
    return Assignment(
        task_id=f"t-{scheme}",
        attempt=1,
        lease_id="l",
        campaign_id=campaign,
        model="digits-mlp",
        backend="qai-hub",
        scheme=scheme,
        artifact=_ref(model),
        eval_data=_ref(inputs),
        settings=SETTINGS,
    )


def _run(
    executor: HubExecutor, files: tuple[Path, Path], scheme: str, campaign: str = "c-1"
) -> TrialsReport:
    phases: list[str] = []
    a = _assignment(files, scheme, campaign)
    return asyncio.run(executor.execute(a, files[0], files[1], lambda p, t=0: phases.append(p)))


def _executor(api: HubApi, work: Path, device: HubDevice | None = None) -> HubExecutor:
    device = device or select_devices(api, names=["Samsung Galaxy S24 (Family)"])[0]
    return HubExecutor(api, device, HubJobs(api, Journal(work / "journal"), FAST))


def _kinds(state: Path) -> Counter[str]:
    return Counter(
        job["type"] + ("+profile" if job["profile"] else "") for job in double.jobs(state)
    )


def test_fp32_and_int8_measure_latency_memory_placement_and_accuracy(
    files: tuple[Path, Path], api: HubApi, state: Path, tmp_path: Path
) -> None:
    executor = _executor(api, tmp_path)
    fp32, int8 = _run(executor, files, "fp32"), _run(executor, files, "int8")
    for report in (fp32, int8):
        (trial,) = report.trials
        assert trial.valid and len(trial.samples_ms) == SETTINGS.min_iterations
        assert trial.peak_rss_bytes > 0 and trial.load_time_s > 0
        assert trial.metrics["npu_layers"] == trial.metrics["layers"] > 0
        assert trial.metrics["inference_memory_peak_high_bytes"] > 0
        assert report.accuracy["examples"] > 100 and report.accuracy["top1"] > 0.8
        assert len(report.example_outcomes) == report.accuracy["examples"]
        assert report.environment["qai_hub.target_runtime"] == "qnn_context_binary"
        assert report.environment["energy.source"].startswith("none: Qualcomm AI Hub's")
    assert fp32.accuracy["agreement"] == 1.0 and fp32.accuracy["max_abs_diff"] == 0.0
    assert int8.accuracy["max_abs_diff"] > 0 and int8.model_size_bytes < fp32.model_size_bytes
    assert "quantize=j" in int8.environment["qai_hub.jobs"]
    assert _kinds(state) == {"compile": 2, "quantize": 1, "inference+profile": 2, "inference": 2}
    # the same tasks again (a re-assignment): every job is re-attached, none submitted
    _run(_executor(api, tmp_path), files, "int8")
    assert len(double.jobs(state)) == 7


def test_an_interrupted_task_reattaches_instead_of_resubmitting(
    files: tuple[Path, Path], api: HubApi, state: Path, tmp_path: Path
) -> None:
    double.write_config(state, job_seconds=0.4)
    journal = Journal(tmp_path / "journal")

    async def interrupted() -> None:
        task = asyncio.ensure_future(
            _executor(api, tmp_path).execute(
                _assignment(files, "int8"), files[0], files[1], lambda p, t=0: None
            )
        )
        while not any(e.step == "quantize" and e.state == SUBMITTED for e in journal.entries()):
            await asyncio.sleep(0.02)
        task.cancel()  # the agent dies while the quantize job runs
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    assert _kinds(state) == {"quantize": 1}
    report = _run(_executor(api, tmp_path), files, "int8")  # a restarted agent
    assert report.trials[0].valid
    assert _kinds(state) == {"quantize": 1, "compile": 1, "inference+profile": 1, "inference": 1}


def test_two_devices_share_one_quantize_job_and_rate_limits_are_retried(
    files: tuple[Path, Path], api: HubApi, state: Path, tmp_path: Path
) -> None:
    double.write_config(state, rate_limit_first=3)
    devices = select_devices(api, attributes=["os:android"])
    jobs = HubJobs(api, Journal(tmp_path / "journal"), FAST)
    executors = [HubExecutor(api, d, jobs) for d in devices]

    async def both() -> list[TrialsReport]:
        return list(
            await asyncio.gather(
                *(
                    e.execute(_assignment(files, "int8"), files[0], files[1], lambda p, t=0: None)
                    for e in executors
                )
            )
        )

    reports = asyncio.run(both())
    assert all(r.trials[0].valid for r in reports)
    assert _kinds(state) == {"quantize": 1, "compile": 2, "inference+profile": 2, "inference": 2}
    assert double.counters(state) == {"attempts": 7 + 3, "rate_limited": 3}


def test_a_failed_compile_is_typed_with_the_hubs_message_and_not_resubmitted(
    files: tuple[Path, Path], api: HubApi, state: Path, tmp_path: Path
) -> None:
    reason = "Tensor 'input' uses an op (Foo) that is not supported on HTP."
    double.write_config(state, fail={"compile": reason})
    executor = _executor(api, tmp_path)
    for _ in range(2):  # the second try answers from the journal
        with pytest.raises(HubJobFailed) as info:
            _run(executor, files, "fp32")
        assert info.value.kind == "hub_job_failed" and reason in str(info.value)
        assert str(info.value).startswith("compile job j")
    assert _kinds(state) == {"compile": 1}
    double.write_config(state, fail={})
    assert _run(executor, files, "fp32", campaign="c-2").trials[0].valid  # a new campaign
    assert _kinds(state)["compile"] == 2


def test_quantized_scheme_without_calibration_fails_clearly(
    files: tuple[Path, Path], api: HubApi, tmp_path: Path
) -> None:
    model, _ = files
    data, _ = build_hub_inputs(model, None, None)
    bare = tmp_path / "bare.npz"
    bare.write_bytes(data)
    with pytest.raises(UnsupportedScheme, match="needs the model's calibration set"):
        _run(_executor(api, tmp_path), (model, bare), "w4a8")
    # fp32 without an eval set: measured, no accuracy
    report = _run(_executor(api, tmp_path), (model, bare), "fp32")
    assert report.trials[0].valid and report.accuracy == {}


def test_a_crash_inside_the_submission_call_finds_the_job_by_name(
    api: HubApi, state: Path, tmp_path: Path, files: tuple[Path, Path]
) -> None:
    """The journal holds the job's name before the call; after a crash between the hub
    accepting the job and its id being journalled, the job is found, not resubmitted."""
    from agent.hub.jobs import JOB_NAME, StepContext
    from agent.hub.journal import SUBMITTING

    double.write_config(state, job_seconds=0.0)
    journal = Journal(tmp_path / "journal")
    jobs = HubJobs(api, journal, FAST)
    ctx = StepContext(campaign_id="c-1", attempt=1)
    onnx = tmp_path / "digits.onnx"
    onnx.write_bytes(files[0].read_bytes())
    model = api.client.upload_model(str(onnx), name="digits")
    facts = {"model": "digits", "scheme": "fp32"}
    key = Journal.key("compile", **facts)
    device = api.client.get_devices(attributes=["framework:qnn"])[0]

    def submit(name: str) -> object:
        return api.client.submit_compile_job(
            model,
            device=device,
            name=name,
            input_specs={"input": ((1, 64), "float32")},
            options="--target_runtime tflite",
            retry=False,
        )

    # What a crash leaves: the intent is journalled and the hub got the job, no id yet.
    crashed = submit("digits compile #crashed01")
    journal.put(
        JournalEntry(
            key=key,
            step="compile",
            hub_id="",
            state=SUBMITTING,
            facts={**facts, JOB_NAME: "digits compile #crashed01"},
        )
    )
    result = asyncio.run(jobs.run("compile", facts, ctx, "digits compile", submit))
    assert result.job.job_id == crashed.job_id
    assert len(double.jobs(state)) == 1  # nothing submitted again
    entry = journal.get(key)
    assert entry is not None and entry.hub_id == crashed.job_id and entry.state != SUBMITTING

    # Had the hub not got it, the step is submitted (once) under a new name.
    other = {"model": "digits", "scheme": "fp16"}
    journal.put(
        JournalEntry(
            key=Journal.key("compile", **other),
            step="compile",
            hub_id="",
            state=SUBMITTING,
            facts={**other, JOB_NAME: "lost #x"},
        )
    )
    again = asyncio.run(jobs.run("compile", other, ctx, "digits compile", submit))
    assert again.job.job_id != crashed.job_id and len(double.jobs(state)) == 2
