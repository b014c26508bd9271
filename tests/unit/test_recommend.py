"""`recommend`: best, runners-up and a reason for every excluded configuration."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from edgefarm.cli import recommend_cmd
from edgefarm.cli.main import cli
from edgefarm.cli.recommend_cmd import parse_fraction, parse_size, resolve_device
from edgefarm.errors import UsageError
from results.recommend import Objective, recommend

MIB = 1 << 20


def row(
    model: str,
    scheme: str,
    p50: float,
    mem_mib: float,
    device: str = "pi",
    backend: str = "",
    result_id: int = 0,
    **acc: float,
) -> dict[str, Any]:
    llm = model == "slm"
    return {
        "result_id": result_id,
        "device_id": f"{device}-id",
        "device_name": device,
        "model": model,
        "backend": backend or ("llama-cpp" if llm else "onnxruntime"),
        "scheme": scheme,
        "ok": True,
        "valid": True,
        "lat_p50_ms": p50,
        "peak_rss_bytes": int(mem_mib * MIB),
        "model_size_bytes": int(mem_mib * MIB / 2),
        "accuracy": acc,
        "metrics": {"prompt_tok_per_s": 400.0} if llm else {},
    }


def slm_rows() -> list[dict[str, Any]]:
    return [
        row("slm", "F16", 20.0, 330, kld_mean=0.0, top1_agreement=1.0),
        row("slm", "Q8_0", 14.0, 210, kld_mean=0.003, top1_agreement=0.95),
        row("slm", "Q4_K_M", 13.0, 180, kld_mean=0.04, top1_agreement=0.84),
        row("slm", "Q5_K_M", 13.5, 190, kld_mean=0.01, top1_agreement=0.9),
        {**row("slm", "Q2_K", 9.0, 120), "ok": False, "error_kind": "timeout"},
        {
            **row("slm", "Q3_K", 10.0, 150, kld_mean=0.1),
            "valid": False,
            "invalid_reason": "too few iterations",
        },
        row("slm", "IQ4_XS", 11.0, 170, device="jetson", kld_mean=0.02),
    ]


def reasons(rec: Any) -> dict[str, tuple[str, ...]]:
    return {e.scheme: e.reasons for e in rec.excluded}


def test_best_is_fastest_admissible_with_runners_up_and_reasons() -> None:
    rec = recommend(slm_rows(), "pi", max_memory_bytes=300 * MIB, max_kld=0.02)
    assert rec.best is not None and rec.best.scheme == "Q5_K_M"
    assert [c.scheme for c in rec.runners_up] == ["Q8_0"] and rec.admissible == 2
    why = reasons(rec)
    assert why["F16"] == ("peak memory 330.0 MiB is 30.0 MiB over the 300.0 MiB limit",)
    assert why["Q4_K_M"] == ("KLD 0.04 over the 0.02 limit",)
    assert why["Q2_K"] == ("failed (timeout)",)
    assert why["Q3_K"] == ("invalid measurement: too few iterations",)
    assert why["IQ4_XS"] == ("not measured on pi (only on jetson)",)
    assert len(rec.excluded) + rec.admissible == 7  # every configuration is accounted for
    assert "fastest of 2 admissible configurations" in rec.why()
    assert "1.04x faster than llama-cpp/Q8_0" in rec.why()
    assert "13.50 ms/token p50 (74.1 tok/s)" in rec.best.describe()


def test_all_reasons_are_given_and_none_admissible() -> None:
    rec = recommend(slm_rows(), "pi-id", max_memory_bytes=100 * MIB, max_kld=0.001)
    assert rec.best is None and rec.runners_up == ()
    assert len(reasons(rec)["Q4_K_M"]) == 2  # over memory and over KLD
    assert rec.why().startswith("no measured configuration meets peak memory <= 100.0 MiB")


def test_accuracy_drop_for_language_models_is_lost_top1_agreement() -> None:
    rec = recommend(slm_rows(), "pi", max_accuracy_drop=0.06)
    assert rec.best is not None and rec.best.scheme == "Q8_0"
    assert [c.scheme for c in rec.runners_up] == ["F16"]
    assert reasons(rec)["Q5_K_M"] == (
        "top-1 agreement with full precision drops by 10.00%, over the 6.00% limit",
    )


def test_classifier_accuracy_drop_against_full_precision_reference() -> None:
    rows = [
        row("digits", "fp32", 1.0, 100, top1=0.98),
        row("digits", "int8", 0.5, 50, top1=0.975),
        row("digits", "int4", 0.4, 40, top1=0.95),
        row("digits", "fp16", 0.8, 80, top1=0.90, reference_top1=0.91),  # stored reference
        row("other", "int8", 0.1, 10, top1=0.9),  # no full-precision run of "other"
    ]
    rec = recommend(rows, "pi", max_accuracy_drop=0.01, max_kld=1.0)
    why = {e.label: e.reasons for e in rec.excluded}
    assert rec.best is None
    assert why["digits onnxruntime/int8"] == ("no KLD measured (not a language model)",)
    rec = recommend(rows, "pi", max_accuracy_drop=0.01)
    assert rec.best is not None and rec.best.scheme == "int8"
    assert abs((rec.best.accuracy_drop or 0) - 0.005) < 1e-12
    assert [c.scheme for c in rec.runners_up] == ["fp16", "fp32"]  # fp16 drops 1% of 0.91
    why = {e.label: e.reasons for e in rec.excluded}
    assert why["digits onnxruntime/int4"] == (
        "top-1 accuracy drops by 3.00%, over the 1.00% limit",
    )
    assert why["other onnxruntime/int8"] == (
        "no full-precision reference of other to compare top-1 with",
    )
    rec = recommend(rows, "pi", model="digits", objective=Objective.MEMORY, runners_up=1)
    assert rec.best is not None and rec.best.scheme == "int4"
    assert [c.scheme for c in rec.runners_up] == ["int8"]
    assert [c.scheme for c in rec.rest] == ["fp16", "fp32"]


def test_newest_usable_measurement_counts() -> None:
    rows = [
        row("digits", "fp32", 2.0, 100, result_id=1, top1=0.9),
        row("digits", "fp32", 1.0, 100, result_id=2, top1=0.9),
        {**row("digits", "fp32", 0.1, 100, result_id=3), "ok": False},
    ]
    rec = recommend(rows, "pi")
    assert rec.best is not None and rec.best.latency_ms == 1.0 and rec.best.result_id == 2


# ----------------------------------------------------------------------------------- CLI


def test_parse_size_and_fraction() -> None:
    assert parse_size("512MB") == 512_000_000
    assert parse_size("1.5GiB") == parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size("300M") == 300 * MIB and parse_size("4096") == 4096
    assert parse_fraction("1%") == 0.01 and parse_fraction("0.05") == 0.05
    with pytest.raises(UsageError, match="cannot read size"):
        parse_size("lots")
    with pytest.raises(UsageError, match="cannot read"):
        parse_fraction("x%")


def test_resolve_device() -> None:
    rows = [row("m", "a", 1, 1, device="pi-4"), row("m", "a", 1, 1, device="pi-5")]
    assert resolve_device(rows, "pi-4") == ("pi-4-id", "pi-4")
    assert resolve_device(rows, "pi-5-") == ("pi-5-id", "pi-5")
    with pytest.raises(UsageError, match="ambiguous"):
        resolve_device(rows, "pi")
    with pytest.raises(
        UsageError, match=r"no results for device 'nano'; devices with results: pi-4"
    ):
        resolve_device(rows, "nano")


def test_cli_recommend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recommend_cmd, "_load_rows", lambda *a: slm_rows())
    args = ["recommend", "--device", "pi", "--max-memory", "300MiB", "--max-kld", "0.02"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "slm on pi (pi-id): best llama-cpp/Q5_K_M" in out
    assert "2. llama-cpp/Q8_0:" in out
    assert "llama-cpp/F16: peak memory 330.0 MiB is 30.0 MiB over the 300.0 MiB limit" in out
    result = CliRunner().invoke(cli, ["recommend", "--device", "nano"])
    assert result.exit_code != 0 and "devices with results: jetson" in str(result.exception)


def test_latencies_inside_their_noise_are_a_tie_decided_by_memory() -> None:
    def timed(scheme: str, p50: float, mem: float, trials: list[float]) -> dict[str, Any]:
        return {**row("slm", scheme, p50, mem, kld_mean=0.01), "trial_medians_ms": trials}

    rows = [
        timed("Q4_K_M", 13.0, 200, [12.8, 13.0, 13.2]),  # fastest on the point estimate
        timed("Q5_K_M", 13.5, 190, [13.2, 13.5, 13.8]),  # 4% slower: within the noise
        timed("Q8_0", 20.0, 150, [19.9, 20.0, 20.1]),  # clearly slower
    ]
    rec = recommend(rows, "pi")
    assert rec.best is not None and rec.best.scheme == "Q5_K_M"  # less memory, same speed
    assert [c.scheme for c in rec.runners_up] == ["Q4_K_M", "Q8_0"]
    ((other, interval),) = rec.tied
    assert other.scheme == "Q4_K_M" and interval.low < 1.0 < interval.high
    why = rec.why()
    assert "as fast as llama-cpp/Q4_K_M within the noise" in why
    assert "lower peak memory decides" in why and "faster than" not in why
    # tight trials: a real 4% difference is ranked as before
    rows[1] = timed("Q5_K_M", 13.5, 190, [13.49, 13.5, 13.51])
    rows[0] = timed("Q4_K_M", 13.0, 200, [12.99, 13.0, 13.01])
    rec = recommend(rows, "pi")
    assert rec.best is not None and rec.best.scheme == "Q4_K_M" and rec.tied == ()
    assert "1.04x faster than llama-cpp/Q5_K_M" in rec.why()


def with_energy(r: dict[str, Any], joules: float | None) -> dict[str, Any]:
    if joules is None:
        reason = "none: no RAPL: /sys/class/powercap does not exist; no other energy source"
        return {**r, "environment": {"energy.source": reason}}
    metrics = {**r["metrics"], "energy_per_inference_j": joules}
    return {**r, "metrics": metrics, "environment": {"energy.source": "rapl: package-0"}}


def energy_rows() -> list[dict[str, Any]]:
    return [
        with_energy(row("slm", "Q8_0", 14.0, 210, kld_mean=0.003), 0.30),
        with_energy(row("slm", "Q4_K_M", 13.0, 180, kld_mean=0.04), 0.45),  # faster, hotter
        with_energy(row("slm", "Q5_K_M", 13.5, 190, kld_mean=0.01), 0.25),
        with_energy(row("slm", "F16", 20.0, 330, kld_mean=0.0), None),
    ]


def test_an_energy_budget_in_joules_per_token() -> None:
    rec = recommend(energy_rows(), "pi", max_energy_j=0.3)
    assert rec.best is not None and rec.best.scheme == "Q5_K_M"
    assert rec.best.energy_j == 0.25 and "250 mJ/token" in rec.best.describe()
    assert [c.scheme for c in rec.runners_up] == ["Q8_0"]
    why = reasons(rec)
    assert why["Q4_K_M"] == ("energy 450 mJ/token is over the 300 mJ limit",)
    assert why["F16"] == (
        "no energy measured (no RAPL: /sys/class/powercap does not exist; no other energy source)",
    )
    assert "energy <= 300 mJ" in rec.why()
    # no budget: the fastest wins whatever it draws
    fastest = recommend(energy_rows(), "pi")
    assert fastest.best is not None and fastest.best.scheme == "Q4_K_M"


def test_the_energy_objective_ranks_by_joules_and_needs_a_measurement() -> None:
    rec = recommend(energy_rows(), "pi", objective=Objective.ENERGY)
    assert rec.best is not None and rec.best.scheme == "Q5_K_M"
    assert [c.scheme for c in rec.runners_up] == ["Q8_0", "Q4_K_M"]
    assert "least energy per inference" in rec.why() and "1.20x less energy" in rec.why()
    assert reasons(rec)["F16"][0].startswith("no energy measured")


def test_cli_energy_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recommend_cmd, "_load_rows", lambda *a: energy_rows())
    args = ["recommend", "--device", "pi", "--max-joules-per-token", "0.3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "best llama-cpp/Q5_K_M" in result.output
    assert "llama-cpp/Q4_K_M: energy 450 mJ/token is over the 300 mJ limit" in result.output
    bad = CliRunner().invoke(cli, [*args[:-1], "-1"])
    assert bad.exit_code != 0 and "must be a positive number" in str(bad.exception)
