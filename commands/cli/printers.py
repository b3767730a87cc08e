"""What the commands print: the export table, an evaluation with its verdict, a joint attack
and an audit (the JSON reports hold every figure; these are the lines a person reads)."""

from pathlib import Path

import click

from safeexport import names
from safeexport.plots import fmt_figure, fmt_interval


def export_table(rows: list[dict]) -> None:
    click.echo(f"{'export':32}{'bytes':>10}{'gzip':>10}{'floor':>10}{'acc':>7}{'->':>7}"
               f"{'agree':>7}{'SNR dB':>8}")
    for r in rows:
        if r["status"] != "ok":
            click.echo(f"{r['name']:32}FAILED: {r['reason']}")
            continue
        snr = "exact" if r["snr_db"] is None else f"{r['snr_db']:.1f}"
        click.echo(f"{r['name']:32}{r['bytes']:10,}{r['gzip_bytes']:10,}{r['floor_bytes']:10,}"
                   f"{r['acc_before']:7.3f}{r['acc_after']:7.3f}{r['agreement']:7.3f}{snr:>8}")


def joint(res) -> None:
    j = res.joint
    click.echo(f"joint attack on {len(j['files'])} variants (an attacker holding every file):")
    for label, key in (("joint", "strongest_joint"), ("single", "strongest_single")):
        m = j[key]
        where = (f" on {Path(j['files'][m['variant']]).name}" if key == "strongest_single"
                 else "")
        click.echo(f"  strongest {label:7}{m['attack']:>17}{where}: MIA acc "
                   f"{fmt_interval(m, 'mia_acc')}, AUC {m['auc']:.3f}, TPR@1% "
                   f"{fmt_figure(m['tpr_at_1pct_fpr'], '.3f')}")
    d = j["difference"]["mia_acc"]
    ci = ("no interval (identical scores)" if d["ci"] is None else
          f"paired 95% interval {100 * d['ci'][0]:+.2f} to {100 * d['ci'][1]:+.2f}")
    verdict = ("the joint attack is stronger" if j["joint_exceeds_single"] else
               "no gain of the joint attack beyond the noise")
    click.echo(f"  joint − single MIA accuracy {100 * d['delta']:+.2f} points ({ci}): {verdict}")
    click.echo(f"joint report {res.json_path}")


def evaluation(model_file: Path, res) -> None:
    r = res.report
    click.echo(f"{model_file.name} on {r['runtime']['name']} ({r['runtime']['version']}), "
               f"{r['samples']['eval_members']}+{r['samples']['eval_nonmembers']} unknown "
               f"members/non-members, {r['samples']['test']} test samples")
    v = r["verdict"]
    click.echo(f"{'':10}{'task acc':>9}{'MIA acc (95% CI)':>24}{'AUC':>7}{'TPR@1%':>8}"
               f"{'TPR@.1%':>8}{'TM':>7}  ({r['attack']['name']} attack)")
    for label, key in (("PyTorch", "before"), ("exported", "after")):
        m = r[key]
        click.echo(f"{label:10}{m['task_acc']:9.4f}{fmt_interval(m, 'mia_acc'):>24}"
                   f"{m['auc']:7.3f}{fmt_figure(m['tpr_at_1pct_fpr'], '8.3f')}"
                   f"{fmt_figure(m['tpr_at_0.1pct_fpr'], '8.3f')}{m['tm_score']:7.3f}")
    refs = r["after"].get("reference_attacks")
    if refs:
        st = refs["settings"]
        click.echo(f"reference attacks ({st['references']} {st['method']} reference models, "
                   f"{st['models']}; PyTorch -> exported):")
        for name in names.REFERENCE_ATTACKS:
            b, a = r["before"]["reference_attacks"][name], refs[name]
            click.echo(f"  {name.upper():6} AUC {b['auc']:.3f} -> {a['auc']:.3f}   TPR@1% "
                       f"{fmt_figure(b['tpr_at_1pct_fpr'], '.3f')} -> "
                       f"{fmt_figure(a['tpr_at_1pct_fpr'], '.3f')}   TPR@0.1% "
                       f"{fmt_figure(b['tpr_at_0.1pct_fpr'], '.3f')} -> "
                       f"{fmt_figure(a['tpr_at_0.1pct_fpr'], '.3f')}")
    click.echo(f"largest rise over {len(v['attacks'])} attacks (paired 95% interval, "
               f"tolerance {100 * v['max_mia_rise']:g} points):")
    for fig, d in v["rises"]["max"].items():
        if d["delta"] is None:
            continue
        ci = (f"{100 * d['ci'][0]:+.2f} to {100 * d['ci'][1]:+.2f}" if d["ci"]
              else "no interval")
        click.echo(f"  {fig:16}{100 * d['delta']:+7.2f} points ({ci}), {d['attack']}")
    click.echo(f"top-1 agreement {r['parity']['agreement']:.4f}; task accuracy change "
               f"{-100 * v['task_drop']:+.2f} points; report {res.json_path}, "
               f"ROC {res.plot_path.name}")
    for w in r["warnings"]:
        click.echo(f"warning: {w}")
    for why in v.get("not_decidable", []):  # reports from before the rule have none
        click.echo(f"left out of the verdict: {why}")
    if v["outcome"] == "PASS":
        click.echo("PASS: no attack's rise reaches the tolerance (95% upper bounds below it), "
                   "and accuracy kept")
    elif v["outcome"] == "FAIL":
        click.echo("FAIL: " + "; ".join(v["reasons"]))
    else:
        beyond = (", more samples than the dataset has" if v.get("samples_needed_exceed_data")
                  else "")
        more = (f"about {v['samples_needed']} evaluated samples (now {v['evaluated']}{beyond}) "
                "would decide it if the rise stays where it is" if v["samples_needed"] else
                "a point rise is above the tolerance without being proven: more samples would "
                "decide whether it is real")
        click.echo("INCONCLUSIVE: " + "; ".join(v["undecided"]) + f"; {more}")


def audit(res) -> None:
    r, f = res.report, res.report["figures"]
    s = r["samples"]
    click.echo(f"audit of {Path(r['model_file']).name} on {r['runtime']['name']} "
               f"({r['runtime']['version']}): {s['eval_members']}+{s['eval_nonmembers']} "
               f"members/non-members measured, attacker trained on {s['known_members']}+"
               f"{s['known_nonmembers']}")
    lo, hi = f["task_acc_ci"]
    click.echo(f"task accuracy {f['task_acc']:.4f} [{lo:.4f}, {hi:.4f}] on {r['task_acc_on']}")
    click.echo(f"{'attack':18}{'MIA acc (95% CI)':>26}{'AUC':>7}{'TPR@1%':>8}")
    refs = r["reference_attacks"]
    rows = [(f["attack"], f), *f["threshold_attacks"].items(),
            *(((name, refs[name]) for name in names.REFERENCE_ATTACKS) if isinstance(refs, dict)
              else ())]
    for name, m in rows:
        click.echo(f"{name:18}{fmt_interval(m, 'mia_acc'):>26}{m['auc']:7.3f}"
                   f"{fmt_figure(m['tpr_at_1pct_fpr'], '8.3f')}")
    if isinstance(refs, dict):
        st = refs["settings"]
        click.echo(f"  (LiRA, RMIA: {st['references']} {st['method']} reference models per "
                   f"half, cross-fitted: {r['references']['folder']} and "
                   f"{Path(r['references']['swapped_folder']).name}; every member ranked)")
    else:
        click.echo(f"reference attacks {refs}")
    click.echo(f"strongest: {f['strongest']['attack']}")
    top = r["exposure"]["records"][:5]
    if top:
        click.echo(f"most exposed members ({r['exposure']['attack']}; row of the members "
                   f"file: FPR at which it is flagged): "
                   + ", ".join(f"{e['index']}: {e['flagged_fpr']:.3f}" for e in top))
    for w in r["warnings"]:
        click.echo(f"warning: {w}")
    from device_eval.run import exposure_path

    click.echo(f"report {res.json_path}, ROC {res.plot_path.name}, exposure "
               f"{exposure_path(res.json_path).name}")
