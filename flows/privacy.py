"""The ``privacy`` flow: audit -> gate -> release. A model reaches the registry only through a passing gate.

The audit task runs every probe and writes the report (``privacy.audit``); the gate task reads its decision; the
release task copies the model into the registry (``privacy.release``, which re-checks the checksum itself) and is
skipped, with the reasons logged, when the gate did not pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from privacy.audit import audit
from privacy.release import release


@task(cache_policy=NO_CACHE)
def audit_task(model: Path, data: Path, out: Path, config: Path | None, reference: Path | None,
               train_reference: bool, synthetic_samples: int | None, signing_key: Path | None = None
               ) -> dict[str, Any]:
    """Run the privacy audit; returns the report (also written to ``out`` and ``model/privacy``, signed with
    ``signing_key`` when given)."""
    logger = get_run_logger()
    return audit(model, data, out, config=config, reference=reference, train_reference=train_reference,
                 synthetic_samples=synthetic_samples, progress=logger.info, signing_key=signing_key)


@task(cache_policy=NO_CACHE)
def gate_task(report: dict[str, Any]) -> bool:
    """True when the audit PASSED; logs the decision and every reason."""
    logger = get_run_logger()
    logger.info("privacy gate: %s (valid: %s)", report["decision"], report["valid"])
    for reason in report["reasons"]:
        logger.info("  %s", reason)
    return report["decision"] == "PASS"


@task(cache_policy=NO_CACHE)
def release_task(model: Path, registry: Path, name: str | None, signing_key: Path | None = None,
                 public_key: Path | None = None) -> dict[str, Any]:
    """Copy the audited model into the registry (refused by the library if anything changed since the audit, or
    the report is not signed by a key the registry trusts)."""
    return release(model, registry, name=name, signing_key=signing_key, public_key=public_key)


@flow(name="privacy")
def privacy(model: Path, data: Path, out: Path, registry: Path | None = None, name: str | None = None,
            config: Path | None = None, reference: Path | None = None, train_reference: bool = False,
            synthetic_samples: int | None = None, signing_key: Path | None = None,
            public_key: Path | None = None) -> dict[str, Any]:
    """Audit ``model`` (trained on ``data``), gate it, and release it into ``registry`` if the gate passed.

    ``signing_key`` (``foresight keys init``) signs the report and the release record; ``public_key``: the key the
    release trusts (default: the registry's pinned keys, or the signing key's on a new registry). Without a signing
    key the report is unsigned and the release refuses it."""
    report = audit_task(model, data, out, config, reference, train_reference, synthetic_samples, signing_key)
    passed = gate_task(report)
    result: dict[str, Any] = {"decision": report["decision"], "valid": report["valid"], "reasons": report["reasons"],
                              "report": report["written"], "released": None}
    if registry is None:
        get_run_logger().info("no registry given: audit and gate only")
    elif passed:
        result["released"] = release_task(model, registry, name, signing_key, public_key)
    else:
        get_run_logger().warning("release skipped: the privacy gate decided %s, not PASS (reasons above)",
                                 report["decision"])
    return result
