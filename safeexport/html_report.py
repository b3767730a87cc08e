"""``safeexport report RUN``: one self-contained HTML page a reviewer can be handed.

It reads only what the run directory holds (config.json, report.json, the plots, exports/*.json
manifests, evals/*.json verdicts), after ``open_run`` has checked every recorded hash, plus the
model's prediction and loss on the most exposed records (report.json ranks them). Plots are
embedded as data URIs; every string from a file is HTML-escaped; the page has no script and
loads nothing.
"""

import base64
import html
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from safeexport.attacks.base import Signals
from safeexport.errors import ConfigError
from safeexport.plots import fmt_interval
from safeexport.rundir import RunDir, atomic_write, check_targets, read_json_file
from safeexport.runio import inputs_of, load_data, load_model, open_run
from safeexport.runtimes import torch_runtime

EXPOSED_SHOWN = 10  # rows of the most-exposed-records table

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.pass{background:#1b7a2f;color:#fff;padding:.1em .5em;border-radius:3px}
.fail{background:#b3261e;color:#fff;padding:.1em .5em;border-radius:3px}
.inconclusive{background:#a15c00;color:#fff;padding:.1em .5em;border-radius:3px}
code{font-size:12px;word-break:break-all}img{max-width:100%;border:1px solid #eee}
.note{color:#555}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _fig(value: float | None, ci: list | None = None, digits: int = 4) -> str:
    """A figure with its 95% interval, or "not measurable"."""
    if value is None:
        return "not measurable"
    text = f"{value:.{digits}f}"
    if ci:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def _interval(ci: list | None) -> str:
    """A paired interval in points, or "identical" where the scores did not change."""
    return "identical" if ci is None else f"{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}"


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; cells are already escaped; the first ``left`` columns align left."""
    def cells(tag: str, row: list[str]) -> str:
        return "".join(f'<{tag}{" class=l" if i < left else ""}>{c}</{tag}>'
                       for i, c in enumerate(row))
    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _density(m: dict) -> str:
    """A model's masked-layer density and its whole-model density (every parameter: a
    transformer's dense embeddings make the two far apart); the dense reference keeps all,
    and a run from before the whole-model figure shows a dash for it."""
    if "density" not in m:
        return "1.0000 / 1.0000"
    whole = m.get("model_density")
    return f"{m['density']:.4f} / " + ("—" if whole is None else f"{whole:.4f}")


REMAKE_RUN = "re-run `safeexport compress` to make the run again"


@contextmanager
def _fields_of(path: Path, fix: str):
    """A field of ``path`` that is missing or of the wrong type while the page is built is one
    error naming the file and ``fix``, not a traceback: these files are JSON a user can edit,
    and report.json, which records the other files' hashes, has no record of its own."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path} is damaged ({type(e).__name__}: {e}); {fix}") from e


def _figures_section(report: dict) -> str:
    rows = []
    for label, key in (("dense reference", "dense"), (report["method"], "compressed")):
        if key not in report:
            continue
        m = report[key]
        s, ci = m["strongest"], m["ci"]
        rows.append([_e(label), _fig(m["task_acc"], m.get("task_acc_ci")),
                     _e(m["attack"]), _e(fmt_interval(m, "mia_acc")),
                     _fig(m["auc"], ci.get("auc"), 3),
                     _fig(m["tpr_at_1pct_fpr"], ci.get("tpr_at_1pct_fpr"), 3),
                     _e(s["attack"]), _fig(s["mia_acc"], s["ci"].get("mia_acc")),
                     _density(m)])
    m = report["compressed"]
    notes = "".join(f"<li>{_e(n)}</li>" for n in m.get("not_measurable", []) + m["warnings"])
    return ("<h2>Figures (95% bootstrap intervals)</h2>"
            + _table(["model", "task acc", "attack", "MIA acc", "AUC", "TPR at 1% FPR",
                      "strongest attack", "its MIA acc",
                      "density: masked layers / all parameters"], rows)
            + f"<p class=note>Measured on {m['n_members']} unknown members and "
            f"{m['n_nonmembers']} non-members. The strongest attack is the one with the "
            "highest MIA accuracy; a difference whose intervals overlap is not a measured "
            "difference.</p>" + (f"<ul>{notes}</ul>" if notes else ""))


def _verdicts_section(run: RunDir) -> str:
    evals = sorted((run.path / "evals").glob("*.json")) if (run.path / "evals").is_dir() else []
    if not evals:
        return ("<h2>Verdicts on exported files</h2><p>No exported file has been evaluated "
                "yet: run <code>safeexport evaluate RUN/exports/FILE</code>.</p>")
    rows, plots = [], []
    for path in evals:
        r = read_json_file(path)
        with _fields_of(path, "evaluate the file again with --overwrite, or delete it"):
            v = r["verdict"]
            badge = f'<span class={v["outcome"].lower()}>{v["outcome"]}</span>'
            largest = []
            for fig, d in v["rises"]["max"].items():
                if d["delta"] is not None:
                    largest.append(f"{fig} {100 * d['delta']:+.2f} [{_interval(d['ci'])}] "
                                   f"({d['attack']})")
            why = (v["reasons"] or v["undecided"] or ["every upper bound below the tolerance"]
                   ) + v.get("not_decidable", [])  # reports from before the rule have none
            rows.append([_e(Path(r["model_file"]).name), _e(r["runtime"]["name"]), badge,
                         _e("; ".join(largest)), f"{100 * v['task_drop']:+.2f}",
                         _e("; ".join(why))])
        plots.append(_img(path.with_suffix(".png"), f"ROC of {path.stem}"))
    return ("<h2>Verdicts on exported files</h2>"
            + _table(["file", "runtime", "verdict",
                      "largest rise over all attacks, points [paired 95%] (attack)",
                      "task acc drop, points", "reasons"], rows, 2)
            + "".join(plots))


REMAKE_EXPORT = "export again with --overwrite, or delete it"


def _manifests(run: RunDir) -> dict[Path, dict]:
    """The export manifests in RUN/exports/ by path (read once for the exports and hashes
    tables)."""
    folder = run.path / "exports"
    found = ({p: read_json_file(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir()
             else {})
    return {p: m for p, m in found.items()
            if all(k in m for k in ("file", "sha256", "source", "parity", "sizes"))}


def _exports_section(manifests: dict[Path, dict]) -> str:
    if not manifests:
        return "<h2>Exports</h2><p>None yet: run <code>safeexport export</code>.</p>"
    rows = []
    for path, m in manifests.items():
        with _fields_of(path, REMAKE_EXPORT):
            p, s = m["parity"], m["sizes"]
            rows.append([_e(Path(m["file"]).name), _e(m["format"]), _e(m["bits"]),
                         f"{s['bytes']:,}", f"{s['floor_bytes']:,}",
                         f"{p['acc_before']:.4f} → {p['acc_after']:.4f}",
                         f"{p['agreement']:.4f}", f"<code>{_e(m['sha256'])}</code>"])
    return "<h2>Exports</h2>" + _table(["file", "format", "bits", "bytes", "information floor",
                                        "test acc PyTorch → file", "top-1 agreement",
                                        "sha256"], rows)


def beats_chance(row: dict) -> bool:
    """Whether some attack of a report row (the configured one, the threshold and reference
    attacks) has an MIA accuracy or AUC interval that excludes 0.5."""
    attacks = [row, *row.get("threshold_attacks", {}).values(),
               *(v for k, v in row.get("reference_attacks", {}).items() if k != "settings")]
    return any(ci[0] > 0.5 or ci[1] < 0.5 for m in attacks for key in ("mia_acc", "auc")
               if (ci := m.get("ci", {}).get(key)))


def _exposed_section(run: RunDir, report: dict, data_dir: Path | None) -> str:
    """The evaluated members the run's exposure ranking (report.json's ``exposure``: LiRA when
    references ran, else the strongest attack) flags at the lowest false-positive rate, with
    the model's prediction and loss on each."""
    exposure = report.get("exposure")
    if exposure is None:
        return ("<h2>Most exposed records</h2><p class=note>Not recorded: this run was made "
                "before safeexport ranked records; run compress again to get them.</p>")
    records = exposure["records"][:EXPOSED_SHOWN]
    ds, _ = load_data(run, data_dir)
    idx = np.array([r["index"] for r in records], dtype=np.int64)
    s = Signals.from_logits(torch_runtime(load_model(run))(inputs_of(ds, idx)), ds.y[idx])
    loss = -s.log_probs.gather(1, s.labels[:, None])[:, 0].numpy()
    pred = s.logits.argmax(1).numpy()
    rows = [[str(r["index"]), _e(r["label"]), _e(pred[k]), f"{loss[k]:.4g}",
             f"{r['score']:.4g}", f"{r['flagged_fpr']:.4f}"] for k, r in enumerate(records)]
    n = report["compressed"]["n_nonmembers"]
    caveat = ("" if beats_chance(report["compressed"]) else
              "<p class=note><b>No attack measurably beats chance on this model</b> (every MIA "
              "accuracy and AUC interval contains 0.5): this ranking orders noise and is not "
              "evidence that these records leak.</p>")
    return ("<h2>Most exposed records</h2>" + caveat +
            f"<p>The {len(records)} evaluated members the <b>{_e(exposure['attack'])}</b> "
            "attack flags at the lowest false-positive rate (the fraction of non-members that "
            "score at least as high): 0 means the record outscores every non-member; with "
            f"{n} non-members the rate moves in steps of {1 / n:.4f}. Every member's rank is "
            "in exposure.csv.</p>"
            + _table(["sample index", "label", "predicted", "loss", "score", "flagged at FPR"],
                     rows))


def _hashes_section(manifests: dict[Path, dict], run: RunDir, config: dict,
                    report: dict) -> str:
    rows = [[_e(name), f"<code>{_e(h)}</code>"] for name, h in report["files"].items()]
    rows.append(["data fingerprint", f"<code>{_e(config['dataset_fingerprint'])}</code>"])
    if config.get("init_weights_sha256"):
        rows.append(["--init-weights", f"<code>{_e(config['init_weights_sha256'])}</code>"])
    for m in manifests.values():
        rows.append([_e(Path(m["file"]).name), f"<code>{_e(m['sha256'])}</code>"])
    with _fields_of(run.config, REMAKE_RUN):
        versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in config["versions"].items())
    return ("<h2>Hashes and versions</h2>" + _table(["what", "sha256"], rows)
            + f"<p>Versions at training time: {versions}.</p>")


def write_report(run_path: Path | str | None, out: Path | None = None,
                 overwrite: bool = False, data_dir: Path | None = None) -> Path:
    """Write the run's HTML report to ``out`` (default RUN/report.html, which is the run's own
    and rewritten each time) and return its path."""
    run = open_run(run_path)
    if out is not None:
        if out.suffix.lower() not in (".html", ".htm"):
            raise ConfigError(f"--out {out}: the report is an HTML page; name it *.html")
        check_targets([out], overwrite, "--out", "the report")
    with run.lock(shared=True):
        config, report = run.read_config(), run.read_report()
        cfg = config["config"]
        manifests = _manifests(run)
        with _fields_of(run.report, REMAKE_RUN):
            method = report["method"]
            figures = _figures_section(report)
            exposed = _exposed_section(run, report, data_dir)
        with _fields_of(run.config, REMAKE_RUN):
            title = (f"{method}: {config['model']} on {cfg['dataset']}, "
                     f"keeping {100 * cfg['sparsity']:g}% of weights")
            head = (f"<p>Run <code>{_e(run.path.resolve())}</code>, created "
                    f"{_e(config['created'])}, seed {_e(cfg['seed'])}, "
                    f"{_e(config['num_samples'])} samples, {_e(config['num_classes'])} "
                    "classes.</p>")
        page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}"
                f"</title><style>{CSS}</style></head><body><h1>{_e(title)}</h1>" + head
                + _verdicts_section(run) + figures
                + _img(run.roc_png, "ROC of the final attacks, from FPR = 1/N")
                + _img(run.curve_png, "learning curve")
                + exposed + _exports_section(manifests)
                + _hashes_section(manifests, run, config, report) + "</body></html>")
        target = out or run.path / "report.html"
        atomic_write(target, lambda f: f.write(page.encode("utf-8")))
    return target
