"""``edgefarm recommend``: the best configuration for a device, from measured results."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from edgefarm.cli.options import home_option, open_store, store_option
from edgefarm.errors import UsageError

if TYPE_CHECKING:
    from results.recommend import Recommendation

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> int:
    """Bytes from ``512MB`` (10^6), ``1.5GiB`` / ``1.5G`` (2^30), ``4096`` (bytes)."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"cannot read size {text!r}: use e.g. 512MB, 1.5GiB or 300M")
    number, prefix, suffix = match.groups()
    power = _POWER[prefix.lower()]
    decimal = suffix.lower() == "b" and prefix != ""
    return int(float(number) * (1000 if decimal else 1024) ** power)


def parse_fraction(text: str) -> float:
    """A fraction from ``0.01`` or ``1%``."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a number: use e.g. 0.01 or 1%") from None
    if value < 0:
        raise UsageError(f"{text!r} is negative: limits are positive")
    return value


def resolve_device(rows: list[dict[str, Any]], text: str) -> tuple[str, str]:
    """(device_id, device_name) matching ``text`` exactly or as a unique prefix."""
    known = sorted({(str(r["device_id"]), str(r["device_name"])) for r in rows})
    exact = [d for d in known if text in d]
    found = exact or [d for d in known if d[0].startswith(text) or d[1].startswith(text)]
    if len(found) == 1:
        return found[0]
    listing = ", ".join(f"{name} ({did})" for did, name in known) or "none"
    if not found:
        raise UsageError(f"no results for device {text!r}; devices with results: {listing}")
    shown = ", ".join(f"{name} ({did})" for did, name in found)
    raise UsageError(f"device {text!r} is ambiguous: {shown}; give the device id")


def _load_rows(store_url: str | None, home: str | None, campaign: str | None) -> list[Any]:
    from results.regression.collect import pool_blocks

    with open_store(store_url, home) as store:
        if campaign is None:
            return pool_blocks(store.query_results(), samples_of=store.result_samples)
        record = store.get_campaign(campaign)
        if record is None:
            raise UsageError(f"no campaign '{campaign}' in {store.url}")
        return pool_blocks(
            store.results_for_campaign(record.campaign_id), samples_of=store.result_samples
        )


def _print(rec: Recommendation, name: str) -> None:
    title = f"{rec.model or 'all models'} on {name}"
    if rec.best is None:
        click.echo(f"{title}: {rec.why()}")
    else:
        click.echo(f"{title}: best {rec.best.backend}/{rec.best.scheme}")
        click.echo(f"  {rec.best.describe()}")
        click.echo(f"  why: {rec.why()}")
    for n, c in enumerate(rec.runners_up, start=2):
        if n == 2:
            click.echo("  runners-up:")
        click.echo(f"    {n}. {c.backend}/{c.scheme}: {c.describe()}")
    if rec.rest:
        click.echo(f"  also admissible: {', '.join(f'{c.backend}/{c.scheme}' for c in rec.rest)}")
    if rec.excluded:
        click.echo("  excluded:")
        for e in rec.excluded:
            click.echo(f"    {e.backend}/{e.scheme}: {'; '.join(e.reasons)}")


@click.command()
@click.option("--device", required=True, help="Device id or name (or a unique prefix).")
@click.option("--model", default=None, help="Only this model (default: each model in turn).")
@click.option("--max-memory", default=None, help="Peak memory limit: 500MB, 1.5GiB, 300M.")
@click.option("--max-kld", default=None, type=float, help="Mean KLD limit (language models).")
@click.option(
    "--max-accuracy-drop",
    default=None,
    help="Top-1 drop vs full precision: 0.01 or 1% (LLMs: 1 - top-1 agreement).",
)
@click.option(
    "--max-joules-per-token",
    "max_joules",
    default=None,
    type=float,
    help="Energy limit in joules per generated token (per inference for other models), "
    "where the device measures energy.",
)
@click.option(
    "--objective",
    type=click.Choice(["latency", "memory", "energy"]),
    default="latency",
    show_default=True,
    help="What 'best' minimises among admissible configurations.",
)
@click.option("--campaign", default=None, help="Only this campaign's results (id or prefix).")
@click.option("--json", "as_json", is_flag=True, help="Print the recommendations as JSON.")
@store_option
@home_option
def recommend(
    device: str,
    model: str | None,
    max_memory: str | None,
    max_kld: float | None,
    max_accuracy_drop: str | None,
    max_joules: float | None,
    objective: str,
    campaign: str | None,
    as_json: bool,
    store_url: str | None,
    home: str | None,
) -> None:
    """The fastest configuration on a device within memory, fidelity and energy limits,
    from measured results, with the runners-up and why every other one was excluded."""
    from results.compare import is_llm_row
    from results.recommend import Objective
    from results.recommend import recommend as answer

    memory = parse_size(max_memory) if max_memory is not None else None
    drop = parse_fraction(max_accuracy_drop) if max_accuracy_drop is not None else None
    if max_kld is not None and max_kld < 0:
        raise UsageError("--max-kld must not be negative")
    if max_joules is not None and not max_joules > 0:
        raise UsageError("--max-joules-per-token must be a positive number of joules")
    rows = _load_rows(store_url, home, campaign)
    device_id, name = resolve_device(rows, device)
    models = sorted({str(r["model"]) for r in rows if device_id == r["device_id"]})
    if model is not None and all(r["model"] != model for r in rows):
        known = ", ".join(sorted({str(r["model"]) for r in rows}))
        raise UsageError(f"no results for model {model!r}; models with results: {known}")
    if model is None and max_kld is not None:
        # KLD is a language-model figure: without --model, judge only language models
        llms = {str(r["model"]) for r in rows if device_id == r["device_id"] and is_llm_row(r)}
        skipped = [m for m in models if m not in llms]
        models = [m for m in models if m in llms]
        if skipped and not as_json:
            click.echo(f"(--max-kld applies to language models; skipped: {', '.join(skipped)})")
        if not models:
            raise UsageError(f"--max-kld: no language model has results on {name}")
    answers = [
        answer(
            rows,
            device_id,
            memory,
            max_kld,
            drop,
            Objective(objective),
            model=m,
            max_energy_j=max_joules,
        )
        for m in ([model] if model else models)
    ]
    if as_json:
        click.echo(json.dumps([asdict(a) for a in answers], indent=2))
        return
    for n, a in enumerate(answers):
        if n:
            click.echo()
        _print(a, f"{name} ({device_id})")
