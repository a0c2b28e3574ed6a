"""The `tally` command line: run the suite locally and talk to it."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from tally.cli import accounts as accounts_cli
from tally.cli import alerts as alerts_cli
from tally.cli import authorize as authorize_cli
from tally.cli import billing as billing_cli
from tally.cli import demo as demo_module
from tally.cli import ledger as ledger_cli
from tally.cli import payments as payments_cli
from tally.cli import policies as policies_cli
from tally.cli import pricing as pricing_cli
from tally.cli import statements as statements_cli
from tally.cli import suite
from tally.cli import usage as usage_cli
from tally.kit.config import ConfigError, KitConfig, exit_on_config_error, load_kit_config
from tally.kit.log import configure_logging

app = typer.Typer(
    help="Tally: credits-based metering and billing for AI workloads.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _setup() -> None:
    # The CLI prints for people; library logs only reach it when something is wrong.
    configure_logging("cli", "warning")


def _config() -> KitConfig:
    try:
        return load_kit_config()
    except ConfigError as exc:
        exit_on_config_error(exc)
        raise  # unreachable: exit_on_config_error exits


@app.command()
def up(
    with_gateway: Annotated[bool, typer.Option(
        "--with-gateway", help="Also start the OpenAI-compatible gateway example "
        "(examples/gateway) with its fake model, on TALLY_GATEWAY_PORT (8090).")] = False,
) -> None:
    """Start the five services as separate processes and wait for SERVING."""
    config = _config()
    try:
        statuses = suite.up(config)
        gateway_pid = suite.start_gateway(config) if with_gateway else None
    except RuntimeError as exc:
        typer.echo(f"tally up failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    for s in statuses:
        typer.echo(f"{s.service:<9} {s.state:<11} {s.address}  pid {s.pid}")
    if gateway_pid is not None:
        typer.echo(f"{suite.GATEWAY:<9} {'LISTENING':<11} "
                   f"http://{config.host}:{suite.gateway_port()}/v1  pid {gateway_pid}")
    typer.echo(f"logs in {config.data_dir / 'logs'}; stop with: tally down")


@app.command()
def down() -> None:
    """Stop what `tally up` started (services, then the embedded database)."""
    stopped = suite.down(_config())
    typer.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def status() -> None:
    """Print each service's health."""
    statuses = suite.status(_config())
    for s in statuses:
        typer.echo(f"{s.service:<9} {s.state:<11} {s.address}")
    if any(s.state != "SERVING" for s in statuses):
        raise typer.Exit(1)


@app.command()
def migrate() -> None:
    """Upgrade every service's schema to the newest migration."""
    config = _config()
    url = suite.database_url_for_suite(config)
    suite.migrate_all(url)
    typer.echo("migrated: " + ", ".join(suite.SERVICES))


@app.command()
def demo(
    org: Annotated[str, typer.Option(help="Organization the demo acts for.")] = "org-demo",
) -> None:
    """Call each running service once, buy credit through the local checkout page, and run
    a short ledger and metering workload."""
    ok = asyncio.run(demo_module.run(_config(), org))
    if not ok:
        raise typer.Exit(1)


@app.command("trace-demo")
def trace_demo() -> None:
    """Bring up a traced suite, run one metered request, print its span tree across the
    services (Authorize -> ledger -> usage -> outbox -> notifier), and stop the suite."""
    from tally.cli import tracedemo

    if not tracedemo.main(_config()):
        typer.echo("the trace did not reach the notifier", err=True)
        raise typer.Exit(1)


@app.command()
def balance(org: Annotated[str, typer.Argument(help="Organization id.")]) -> None:
    """Print an org's balance, billing state and grants in burn order."""
    asyncio.run(ledger_cli.balance(_config(), org))


@app.command()
def transactions(
    org: Annotated[str, typer.Argument(help="Organization id.")],
    kind: Annotated[list[str] | None, typer.Option(help="Only these kinds, e.g. USAGE.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
) -> None:
    """Print an org's transfers, newest first."""
    asyncio.run(ledger_cli.transactions(_config(), org, kind or [], limit))


@app.command()
def grant(
    org: Annotated[str, typer.Argument(help="Organization id.")],
    amount: Annotated[str, typer.Argument(help='Credits, e.g. "12.5".')],
    kind: Annotated[str, typer.Option(help="promo or bonus.")] = "promo",
    expires: Annotated[str | None, typer.Option(help="Expiry date, YYYY-MM-DD (UTC).")] = None,
    reason: Annotated[str, typer.Option(help="Why the credit is granted.")] = "granted by CLI",
    transfer_id: Annotated[str | None, typer.Option(help="Idempotency id (default: new)")] = None,
) -> None:
    """Grant promotional or bonus credit to an org."""
    asyncio.run(ledger_cli.grant(_config(), org, amount, kind, expires, reason, transfer_id))


@app.command("verify-ledger")
def verify_ledger(
    org: Annotated[str, typer.Option(help="Only this org's chain.")] = "",
) -> None:
    """Walk the ledger's hash chains and balances; exit 1 naming the first bad entry."""
    if not asyncio.run(ledger_cli.verify(_config(), org)):
        raise typer.Exit(1)


usage_cli.register(app, _config)
authorize_cli.register(app, _config)
pricing_cli.register(app, _config)
policies_cli.register(app, _config)
alerts_cli.register(app, _config)
payments_cli.register(app, _config)
accounts_cli.register(app, _config)
billing_cli.register(app, _config)
statements_cli.register(app, _config)


if __name__ == "__main__":
    app()
