"""The audit report: ``report.json`` (every figure, machine-readable) and ``report.html`` (the model card).

The HTML is a Jinja2 template (autoescaped) over the same dict as the JSON, so the two never disagree; plots are
inline PNGs. The report travels with a released model, so it holds aggregates only: no subject ids, no per-subject
scores, no names of codes below the floor.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from foresight.atomic import write_text
from foresight.hashing import sha256

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
{% if report_sha256 %}<meta name="foresight-report-sha256" content="{{ report_sha256 }}">{% endif %}
<title>Privacy model card: {{ r.model.name }}</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.4; }
 h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
 table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
 th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
 th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .PASS { background: #d8f5d8; } .REVIEW { background: #fff1c2; } .FAIL { background: #ffd6d6; }
 .SKIPPED { background: #eee; color: #666; }
 .badge { display: inline-block; padding: 0.2em 0.8em; border-radius: 4px; font-weight: bold; }
 .muted { color: #666; font-size: 0.9em; } code { font-size: 0.9em; }
</style></head><body>
<h1>Privacy model card: {{ r.model.name }}</h1>
<p><span class="badge {{ r.decision }}">{{ r.decision }}</span>
 audit of {{ r.created }} &middot; model checksum <code>{{ r.model.checksum }}</code>
 &middot; audit {{ "valid" if r.valid else ("INVALID" if r.valid is false
                   else "validity unknown (no canary planted often enough)") }}
 &middot; {{ "%.1f"|format(r.runtime_seconds.total) }} s</p>

<h2>Decision</h2>
<table><tr><th>probe</th><th>decision</th><th>reasons</th><th>notes</th></tr>
{% for name, p in r.gate.probes.items() %}
<tr><td>{{ name }}</td><td class="{{ p.decision }}">{{ p.decision }}</td>
<td>{% for x in p.reasons %}{{ x }}<br>{% endfor %}</td>
<td class="muted">{% for x in p.notes %}{{ x }}<br>{% endfor %}</td></tr>
{% endfor %}</table>

<h2>Data</h2>
<table>
<tr><th>data directory</th><td><code>{{ r.data.dir }}</code></td></tr>
<tr><th>fingerprint</th><td><code>{{ r.data.fingerprint }}</code></td></tr>
{% for split, n in r.data.subjects.items() %}<tr><th>{{ split }} subjects / tokens</th>
<td class="num">{{ n }} / {{ r.data.tokens[split] }}</td></tr>{% endfor %}
<tr><th>canaries</th><td>{% if r.data.canaries %}{{ r.data.canaries.canary_subjects }} canary subjects, repeats
 {{ r.data.canaries.repeats }}, {{ r.data.canaries.per_repeat }} per repeat{% else %}none{% endif %}</td></tr>
<tr><th>vocabulary</th><td>{{ r.data.vocab_size }} tokens, floor {{ r.data.vocab_floor }} subjects</td></tr>
<tr><th>national data opt-out</th><td>{% if r.data.opt_out %}{{ r.data.opt_out.subjects_excluded }} subject(s)
 excluded (list sha256 <code>{{ r.data.opt_out.list_sha256[:16] }}</code>){% else %}no list applied at
 tokenization{% endif %}</td></tr>
</table>

<h2>Provenance</h2>
{% set pv = r.data.provenance %}
{% if pv %}<p>Data-use purpose <b>{{ pv.purpose }}</b> (checked {{ pv.checked_on }}: {{ pv.rule }}). Every load
 whose rows reached the model:</p>
<table><tr><th>load</th><th>source</th><th>provider</th><th>allowed purposes</th><th>expires</th><th>loaded</th>
<th>events</th><th>input checksums (sha256)</th><th>opt-out list sha256</th><th>declaration sha256</th></tr>
{% for lp in pv.loads %}<tr><td><code>{{ lp.run_id }}</code></td><td>{{ lp.source }}</td><td>{{ lp.provider }}
{% if lp.controller %}<br><span class="muted">controller {{ lp.controller }}</span>{% endif %}</td>
<td>{{ lp.purposes|join(", ") }}</td><td>{{ lp.expires or "-" }}</td><td>{{ lp.loaded_at or "-" }}</td>
<td class="num">{{ lp.events }}</td>
<td class="muted">{% for f, h in lp.input_checksums.items() %}{{ f }} <code>{{ h[:16] }}</code><br>{% endfor %}</td>
<td><code>{{ (lp.opt_out_sha256 or "none")[:16] }}</code></td>
<td><code>{{ (lp.declaration_sha256 or "undeclared")[:16] }}</code></td></tr>{% endfor %}
</table>
{% else %}<p class="muted">No provenance recorded (tokens made before data-use purposes were recorded).</p>{% endif %}

<h2>Training</h2>
<table>
<tr><th>preset</th><td>{{ r.model.preset }} ({{ r.model.parameters }} parameters)</td></tr>
{% for k, v in r.model.training.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
{% for k, v in r.model.metrics.items() %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>{% endfor %}
</table>

<h2>Membership inference</h2>
<p class="muted">Members: train subjects; non-members: held-out subjects; equal numbers, seeded subsample.
 Each cell: estimate [{{ (100 * r.config.audit.ci_level)|round|int }}% bootstrap interval].
 Reference model: {{ r.probes.membership_inference.reference or "none" }}.</p>
{{ mia_table(r.probes.membership_inference.rows) }}
{% if plots.roc %}<img alt="ROC curves" src="data:image/png;base64,{{ plots.roc }}">{% endif %}

<h2>Canaries</h2>
{% set c = r.probes.canaries %}
{% if c %}
<p>{{ c.references }} never-inserted references; rank exposure saturates at {{ "%.2f"|format(c.max_rank_exposure) }}
 bits, beyond which the skew-normal fit (a={{ "%.2f"|format(c.skew_normal.a) }}, KS
 {{ "%.3f"|format(c.skew_normal.ks_statistic) }}) extrapolates. Exposed: p &lt; {{ c.alpha }} after Bonferroni
 within the repeat group.</p>
<table><tr><th>repeats</th><th>canaries</th><th>exposed</th><th>median exposure (rank)</th>
<th>median exposure (extrapolated)</th><th>max (extrapolated)</th><th>detected</th></tr>
{% for g in c.groups %}<tr><td class="num">{{ g.repeats }}</td><td class="num">{{ g.canaries }}</td>
<td class="num">{{ g.exposed }}</td><td class="num">{{ "%.2f"|format(g.median_exposure_rank) }}</td>
<td class="num">{{ "%.2f"|format(g.median_exposure_extrapolated) }}</td>
<td class="num">{{ "%.2f"|format(g.max_exposure_extrapolated) }}</td><td>{{ g.detected }}</td></tr>{% endfor %}
</table>
{% if plots.exposure %}<img alt="canary exposure" src="data:image/png;base64,{{ plots.exposure }}">{% endif %}
{% else %}<p>No canaries in the training data.</p>{% endif %}

<h2>Extraction</h2>
{% set x = r.probes.extraction %}
<p class="muted">Prompt: static prefix + first k events; continuation: next {{ x.next_events }} event codes.
 Exact = all equal in order; near-exact = at least 8 of 10 equal by position. Non-members matched on age band and
 number of events. k-eidetic: exact member extraction held by fewer than {{ x.eidetic_k }} training subjects.</p>
<table><tr><th>k</th><th>decoding</th><th>pairs</th><th>exact, members</th><th>exact, non-members</th>
<th>gap (points)</th><th>near-exact, members</th><th>near-exact, non-members</th><th>k-eidetic</th></tr>
{% for row in x.by_k %}{% for mode in ["greedy", "sampled"] %}{% if row[mode] %}{% set m = row[mode] %}
<tr><td class="num">{{ row.k }}</td><td>{{ mode }}</td><td class="num">{{ row.pairs }}</td>
<td class="num">{{ est(m.member.exact, 100, "%") }}</td><td class="num">{{ est(m.nonmember.exact, 100, "%") }}</td>
<td class="num">{{ est(m.exact_gap_points) }}</td>
<td class="num">{{ est(m.member.near_exact, 100, "%") }}</td>
<td class="num">{{ est(m.nonmember.near_exact, 100, "%") }}</td>
<td class="num">{{ m.member.eidetic }}</td></tr>{% endif %}{% endfor %}
{% if not row.greedy %}<tr><td class="num">{{ row.k }}</td>
<td colspan="8" class="muted">{{ row.why }}</td></tr>{% endif %}
{% endfor %}</table>

<h2>Vocabulary floor</h2>
{% set v = r.probes.vocabulary_floor %}
<table>
<tr><th>floor required / used by the tokenizer</th><td>{{ v.floor }} / {{ v.tokenizer_min_subjects }}</td></tr>
<tr><th>tokens checked</th><td>{{ v.tokens_checked }} of {{ v.tokens }}</td></tr>
<tr><th>tokens below the floor</th><td>{{ v.tokens_below_floor|length }}</td></tr>
<tr><th>fewest real train subjects behind a token</th><td>{{ v.min_subjects_per_token }}</td></tr>
<tr><th>raw codes below the floor named in vocab.json</th><td>{{ v.below_floor_codes_named_in_vocab }}</td></tr>
{% for name, g in v.sensitive_groups.items() %}<tr><th>sensitive group {{ name }}</th><td>{{ g.tokens|length }}
 token(s){% for t in g.tokens %}{{ ", " if loop.first else "; " }}{{ t.token }} ({{ t.subjects }}){% endfor %};
 {{ g.below_floor_codes_named_in_vocab }} below-floor code(s) named</td></tr>{% endfor %}
</table>

<h2>Synthetic cohort</h2>
{% set s = r.probes.synthetic_cohort %}
{% if s %}<table>
<tr><th>generated timelines</th><td>{{ s.generated }} (compared with {{ s.reference_subjects_per_side }} train and
 held-out subjects each)</td></tr>
<tr><th>share closer to train than to held-out (DCR)</th><td>{{ est(s.dcr_share_closer_to_train, 100, "%") }}</td></tr>
<tr><th>median Jaccard distance to closest train / held-out</th><td>{{ s.median_distance_train }} /
 {{ s.median_distance_holdout }}</td></tr>
<tr><th>exact copies of train / held-out timelines</th><td>{{ s.exact_copies_of_train }} /
 {{ s.exact_copies_of_holdout }}</td></tr>
<tr><th>copies of sequences fewer than {{ s.copy_k }} train subjects share</th>
<td>{{ s.unique_copies_of_train }}</td></tr>
{% if s.rare_copies %}<tr><th>rare sequences (fewer than {{ s.copy_k }} real subjects) reproduced: their train holders
 against chance</th><td>{{ s.rare_copies.timelines }} timeline(s), {{ s.rare_copies.sequences }} sequence(s): {{
 s.rare_copies.train_holders }} train vs {{ s.rare_copies.expected_train_holders }} expected by the split ({{
 s.rare_copies.heldout_holders }} held-out), one-sided p = {{ "%.2g"|format(s.rare_copies.p_value) }}</td></tr>
{% endif %}
</table>{% else %}<p>Not run.</p>{% endif %}

{% if r.probes.embedding_probe is defined %}<h2>Sensitive attributes read from embeddings</h2>
{% set e = r.probes.embedding_probe %}
{% if e %}<p class="muted">A logistic-regression probe reads each sensitive attribute from the model's
 {{ e.pooling }}-pooled embedding of a timeline with that attribute's codes removed, on members and on non-members of
 equal sizes and class balance (cross-fitted halves). A gap demonstrably above {{ e.margin }} (family-wise lower
 bound, level {{ e.familywise_level }}) means the model holds more about the people it was trained on.</p>
<table><tr><th>attribute</th><th>with / without (per side)</th><th>AUROC members</th><th>AUROC non-members</th>
<th>gap</th><th>gap, family-wise lower bound</th></tr>
{% for a in e.attributes %}{% if a.measured %}<tr><td>{{ a.attribute }}</td>
<td class="num">{{ a.positives }} / {{ a.negatives }}</td><td class="num">{{ est(a.auroc_members) }}</td>
<td class="num">{{ est(a.auroc_nonmembers) }}</td><td class="num">{{ est(a.gap) }}</td>
<td class="num">{{ "%.3g"|format(a.gap.ci_low_familywise) if a.gap.ci_low_familywise is not none else "n/a" }}</td>
</tr>{% else %}<tr><td>{{ a.attribute }}</td><td colspan="5" class="muted">not measured: {{ a.why }}</td></tr>
{% endif %}{% endfor %}</table>
{% else %}<p>Not run (switched off).</p>{% endif %}{% endif %}

<h2>Forgotten subjects (opt-out)</h2>
{% if r.probes.forgotten %}{{ mia_table(r.probes.forgotten.rows) }}
<p class="muted">Members: {{ r.probes.forgotten.subjects }} opted-out subjects; non-members: held-out subjects.
 A model never trained on them scores AUC about 0.5.</p>
{% else %}<p>No forgotten set given.</p>{% endif %}

<h2>Thresholds</h2>
<pre>{{ config_text }}</pre>
<h2>Runtime</h2>
<table>{% for k, v in r.runtime_seconds.items() %}<tr><th>{{ k }}</th><td class="num">{{ "%.2f"|format(v) }} s</td></tr>
{% endfor %}</table>
</body></html>
"""

MIA_TABLE = """{% macro mia_table(rows) %}<table><tr><th>slice</th><th>members / non-members</th><th>attack</th>
<th>AUC</th>{% for f in fprs %}<th>TPR at FPR {{ f }}</th>{% endfor %}</tr>
{% for row in rows %}{% if row.measured %}{% for a, figs in row.attacks.items() %}
<tr><td>{{ row.slice }}</td><td class="num">{{ row.members }} / {{ row.nonmembers }}</td><td>{{ a }}</td>
<td class="num">{{ est(figs.auc) }}</td>{% for f in fprs %}<td class="num">{{ est(figs["tpr@" ~ f], 100, "%") }}
{% if not row.fpr_resolvable[f] %}<span class="muted">(FPR not resolvable)</span>{% endif %}
{% if figs.tpr_test and row.judged_fpr is not none and "%g"|format(row.judged_fpr) == f %}<br><span class="muted">judged
 here: p = {{ "%.2g"|format(figs.tpr_test.p_limit) }} vs the limit, {{ "%.2g"|format(figs.tpr_test.p_chance) }} vs
 chance</span>{% endif %}</td>{% endfor %}</tr>
{% endfor %}{% else %}<tr><td>{{ row.slice }}</td><td class="num">{{ row.members }} / {{ row.nonmembers }}</td>
<td colspan="{{ 2 + fprs|length }}" class="muted">not measured: {{ row.why }}</td></tr>{% endif %}{% endfor %}
</table>{% endmacro %}"""


def _est(e: dict[str, Any] | None, scale: float = 1.0, unit: str = "") -> str:
    if not e or e.get("value") is None:
        return "n/a"
    v = f"{e['value'] * scale:.3g}{unit}"
    if e.get("ci_low") is not None and e.get("ci_high") is not None:
        v += f" [{e['ci_low'] * scale:.3g}, {e['ci_high'] * scale:.3g}]"
    return v


def render_html(report: dict[str, Any], plots: dict[str, str] | None = None, report_sha256: str | None = None
                ) -> str:
    """The model card for a report dict (the same dict written as JSON); ``report_sha256``, the digest of the JSON
    text written beside it, ties the card to that file (:func:`html_describes`)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    fprs = [f"{f:g}" for f in report["config"]["mia"]["report_fprs"]]
    macros = env.from_string(MIA_TABLE).make_module({"est": _est, "fprs": fprs})
    tpl = env.from_string(TEMPLATE)
    return tpl.render(r=report, plots=plots or {}, est=_est, mia_table=macros.mia_table,
                      config_text=json.dumps(report["config"], indent=1), report_sha256=report_sha256)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """Base64 PNG of ROC curves (log-log, where low-FPR leakage shows) for each attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=90)
    for name, (fpr, tpr) in curves.items():
        axes[0].plot(fpr, tpr, lw=1.3, label=name)
        axes[1].plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), lw=1.3, label=name)
    for ax in axes:
        ax.plot([1e-4, 1], [1e-4, 1], ls="--", color="grey", lw=0.8)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[0].set_title("ROC, all subjects")
    axes[1].set_title("log-log")
    axes[0].legend(fontsize=8)
    return _png(fig)


def plot_exposure(canaries: dict[str, Any]) -> str:
    """Base64 PNG: extrapolated exposure per canary against its repeat count, with the rank-exposure ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=90)
    rows = canaries["canaries"]
    rs = sorted({c["repeats"] for c in rows})
    for c in rows:
        ax.scatter(rs.index(c["repeats"]), min(c["exposure_extrapolated"], 200),
                   color="tab:red" if c["exposed"] else "tab:blue", s=14)
    ax.axhline(canaries["max_rank_exposure"], ls="--", color="grey", lw=0.8, label="rank-exposure ceiling")
    ax.set_xticks(range(len(rs)), [f"r={r}" for r in rs])
    ax.set_ylabel("exposure (bits, extrapolated)")
    ax.legend(fontsize=8)
    return _png(fig)


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


PROBES = ("membership_inference", "canaries", "extraction", "vocabulary_floor", "synthetic_cohort", "forgotten")


def write(report: dict[str, Any], out_dirs: list[Path], plots: dict[str, str] | None = None) -> list[Path]:
    """Write ``report.json`` then ``report.html`` into each of ``out_dirs``, each atomically (a uniquely named
    temporary file, flushed to disk, then ``os.replace``): a killed audit leaves the previous report or the new
    one, never a truncated file. A JSON and HTML from different audits (killed between the two) is told apart by
    :func:`html_describes`: the card carries the digest of the JSON text."""
    text = json.dumps(report, indent=1, default=_json_default)
    html = render_html(report, plots, report_sha256=sha256(text))
    written = []
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        for name, content in (("report.json", text), ("report.html", html)):
            write_text(d / name, content)
            written.append(d / name)
    return written


def html_describes(html: str, report_text: str) -> bool:
    """Whether a model card was rendered from exactly this ``report.json`` text (the digest :func:`write` put in)."""
    return f'content="{sha256(report_text)}"' in html


APPROVAL_TEMPLATE = """<h2>Reviewer's approval</h2>
<p>The audit decided <b>{{ a.decision }}</b>; <b>{{ a.reviewer }}</b> approved the release on {{ a.approved_at }}
(signed with key <code>{{ a.key_id[:16] }}</code>; <code>privacy/approval.json</code>).</p>
<p>Reason: {{ a.reason }}</p>
<table><tr><th>finding</th><th>probe</th><th>reason</th></tr>
{% for f in a.findings %}<tr><td><code>{{ f.id }}</code></td><td>{{ f.probe }}</td><td>{{ f.reason }}</td></tr>
{% endfor %}</table>
"""


def approval_html(approval: dict[str, Any]) -> str:
    """The model card's section for a reviewer's signed approval of a REVIEW (its payload: who, why, findings)."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    return env.from_string(APPROVAL_TEMPLATE).render(a=approval)


def probe_results(report: dict[str, Any]) -> dict[str, Any]:
    """The probe figures :func:`privacy.gate.decide` took, read back from a report (the inverse of the layout
    :mod:`privacy.audit` writes: membership inference's rows are wrapped with the sample sizes). KeyError naming
    what is missing, TypeError when a part is not the shape the audit writes."""
    probes = report.get("probes")
    if not isinstance(probes, dict):
        raise KeyError("probes")
    missing = [p for p in PROBES if p not in probes]
    if missing:
        raise KeyError(", ".join(missing))
    results = dict(probes)
    mi = probes["membership_inference"]
    if not isinstance(mi, dict) or not isinstance(mi.get("rows"), list):
        raise TypeError("membership_inference has no list of rows")
    results["membership_inference"] = mi["rows"]
    for name in ("extraction", "vocabulary_floor"):
        if not isinstance(probes[name], dict):
            raise TypeError(f"{name} is not a probe result")
    return results


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")
