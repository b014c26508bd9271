"""``edgefarm nightly run|list|report``: nightly regression runs of a suite."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgefarm.cli.options import (
    client_tls,
    client_tls_options,
    home_option,
    open_store,
    store_option,
    token_option,
    verbose_option,
)
from edgefarm.errors import CampaignFailed, RegressionFound, UsageError
from edgefarm.home import default_store_url, edgefarm_home
from edgefarm.logging_setup import configure_logging

if TYPE_CHECKING:
    from results.records import NightlyRun
    from results.report import Report
    from results.store import ResultsStore

REPORT_FORMATS = ("markdown", "json", "html")


@click.group()
def nightly() -> None:
    """Nightly regression runs: measure a suite, compare with its baseline night."""


def _write_reports(report: Report, out_dir: Path, stem: str, formats: tuple[str, ...]) -> None:
    from results.report import render

    suffix = {"markdown": "md", "json": "json", "html": "html"}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            path = out_dir / f"{stem}.{suffix[fmt]}"
            path.write_text(render(report, fmt), encoding="utf-8")
            click.echo(f"report: {path}")
    except OSError as error:
        # The night is stored and its verdict stands: a report that cannot be written
        # must not turn a regression's exit code into something else.
        click.echo(f"warning: cannot write the report to {out_dir}: {error}", err=True)


@nightly.command()
@click.argument("suite", type=click.Path(dir_okay=False))
@click.option(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="Use this coordinator (default: start a local farm on this machine). The store "
    "(--store) must be the coordinator's.",
)
@click.option("--night", default=None, help="Label of this night (default: UTC date and time).")
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write the night's report here (default: HOME/reports).",
)
@click.option(
    "--report-format",
    "formats",
    type=click.Choice(REPORT_FORMATS),
    multiple=True,
    default=("markdown", "html"),
    show_default=True,
)
@token_option
@client_tls_options
@store_option
@home_option
@verbose_option
def run(
    suite: str,
    coordinator: str | None,
    night: str | None,
    report_dir: str | None,
    formats: tuple[str, ...],
    token: str,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    store_url: str | None,
    home: str | None,
    verbose: int,
) -> None:
    """Run one night of SUITE, print its report, exit non-zero on a confirmed regression
    (exit 11) or failed tasks (exit 7)."""
    from coordinator.client import ControlClient
    from coordinator.nightly.runner import NightlyRunner
    from coordinator.nightly.suite import load_suite
    from results.store import ResultsStore

    configure_logging(verbose)
    path = Path(suite)
    load_suite(path)  # a bad suite fails here, before any farm starts
    base = edgefarm_home(home)
    url = store_url or default_store_url(base)
    with ResultsStore.open(url) as store:
        if coordinator:
            tls = client_tls(tls_ca, tls_cert, tls_key)
            with ControlClient(coordinator, token, tls=tls) as client:
                outcome = NightlyRunner(client, store, click.echo).run(path, night)
        else:
            from coordinator.localfarm import LocalFarm

            with (
                LocalFarm(home=base, store_url=url, token=token) as farm,
                ControlClient(farm.address, token) as client,
            ):
                outcome = NightlyRunner(client, store, click.echo).run(path, night)
        report = _night_report(store, outcome.run)
    click.echo(_render(report, "terminal"), nl=False)
    _write_reports(
        report, Path(report_dir) if report_dir else base / "reports", outcome.run.run_id, formats
    )
    if outcome.regressions:
        confirmed = sum(1 for v in outcome.regressions if v.confirmed)
        raise RegressionFound(
            f"night {outcome.run.night} of {outcome.run.suite}: "
            f"{len(outcome.regressions)} regression(s), {confirmed} confirmed by a re-run"
        )
    if outcome.tasks_failed:
        raise CampaignFailed(
            f"night {outcome.run.night} of {outcome.run.suite}: {outcome.tasks_failed} "
            "failed task(s) or missing series (see the notes)"
        )


def _render(report: Report, fmt: str) -> str:
    from results.report import render

    return render(report, fmt)


def _night_report(store: ResultsStore, run: NightlyRun) -> Report:
    """The report of a stored night: its rows, verdicts, notes and series histories."""
    from coordinator.nightly.runner import stored_histories
    from results.regression.codec import verdict_from_dict
    from results.regression.collect import pool_blocks
    from results.report import build_report

    rows: list[dict[str, Any]] = []
    if run.campaign_id:
        found = store.results_for_campaign(run.campaign_id)
        rows = pool_blocks(found, samples_of=store.result_samples)
    verdicts = [verdict_from_dict(v) for v in run.summary.get("verdicts", [])]
    notes = list(run.summary.get("notes", []))
    baseline = f", baseline {run.baseline_run_id}" if run.baseline_run_id else ""
    title = f"nightly {run.suite}: night {run.night} ({run.run_id}{baseline}): {run.status}"
    return build_report(title, rows, verdicts, stored_histories(store, run), notes)


@nightly.command(name="list")
@click.argument("suite_name")
@store_option
@home_option
def list_runs(suite_name: str, store_url: str | None, home: str | None) -> None:
    """The nights of a suite, oldest first."""
    with open_store(store_url, home) as store:
        runs = store.nightly_runs(suite_name)
    if not runs:
        click.echo(f"no nights of suite '{suite_name}' yet")
    for r in runs:
        when = datetime.fromtimestamp(r.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        flagged = len(r.summary.get("verdicts", []))
        click.echo(
            f"{r.run_id}  {when}Z  {r.status:<9} night {r.night:<22} "
            f"baseline {r.baseline_run_id or '-':<14} {flagged} non-unchanged verdict(s)"
        )


@nightly.command()
@click.argument("run_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(("terminal", *REPORT_FORMATS)),
    default="terminal",
    show_default=True,
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None)
@store_option
@home_option
def report(
    run_id: str, fmt: str, output: str | None, store_url: str | None, home: str | None
) -> None:
    """Render the report of a stored night (id or unique prefix)."""
    with open_store(store_url, home) as store:
        run = store.get_nightly_run(run_id)
        if run is None:
            raise UsageError(f"no nightly run '{run_id}' in {store.url}")
        text = _render(_night_report(store, run), fmt)
    if output:
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as error:
            raise UsageError(f"cannot write the report to {output}: {error}") from None
        click.echo(f"report: {output}")
    else:
        click.echo(text, nl=False)
