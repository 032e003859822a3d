"""The ``foresight`` command. Every subcommand has ``--help``; those with ``--json`` print exactly one JSON
object as the last line of stdout (progress and tables go to stderr).

Each command is thin: parse its options, call one library function, print. The commands live in one module per
group (etl, data, model, serve, privacy, concepts, demo) on the typer apps of :mod:`foresight.cli.app`; this
module registers them, in the order ``foresight --help`` lists them. Modules that load torch or Prefect are
imported inside the commands that need them, so ``foresight --help`` and the quick commands start fast.
"""

from __future__ import annotations

from foresight.cli import concepts, data, demo, embed, etl, forecast, keys, model, privacy, serve
from foresight.cli.app import app, concepts_app, etl_app, export_app, privacy_app, serve_app
from foresight.sources import SOURCES

app.command("tokenize")(data.tokenize)
app.command("predict")(model.predict)
app.command("forecast")(model.forecast)
app.command("backtest")(forecast.backtest)
app.command("evaluate")(model.evaluate)
app.command("train")(model.train)
app.command("embed")(embed.embed)
app.command("similar")(embed.similar)
app.command("simulate")(data.simulate)
app.command("demo")(demo.demo)
app.command("release")(privacy.release)

for kind in SOURCES:  # etl mimic-iv, synthea, fhir, meds, notes: one command per source adapter
    etl_app.command(kind)(etl.etl_command(kind))
export_app.command("meds")(data.export_meds)
serve_app.callback()(serve.serve)
serve_app.command("keygen")(serve.keygen)
serve_app.command("revoke")(serve.revoke)
serve_app.command("verify-log")(serve.verify_log)
concepts_app.command("build")(concepts.build)
concepts_app.command("annotate")(concepts.annotate)
privacy_app.command("audit")(privacy.audit)
privacy_app.command("insert-canaries")(privacy.insert_canaries)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(keys.registry_app, name="registry")
keys.keys_app.command("init")(keys.keys_init)
keys.registry_app.command("verify")(keys.verify)
keys.registry_app.command("trust")(keys.trust)


def main() -> None:  # pragma: no cover - console entry point
    """The console entry point: run the ``foresight`` app on ``sys.argv``."""
    app()


__all__ = ["app", "main"]
