"""Compare an experiment's runs: what each changed in its config, its best monitored value and epoch, its test or
out-of-fold score, newest first.

    python runs.py saved/<name>            also writes saved/<name>/runs.html (click a column to sort)

Any folder of runs works: an experiment, a --folds run group, a tune.py study.
"""
import sys
from pathlib import Path

from logger.report import esc, page, read_history
from trainer.trackers import flatten
from utils.util import ArgumentParser, Outcome, UserError, error_line, read_json, write_text

MAX_DEPTH = 4
MAX_RUNS = 5_000
SORTING = ("<script>document.querySelectorAll('th').forEach((th,i)=>th.onclick=()=>{const t=th.closest('table'),"
           "rows=[...t.querySelectorAll('tr')].slice(1),up=th.dataset.up!=='1';th.dataset.up=up?'1':'0';"
           "const key=r=>{const s=r.children[i].textContent,n=parseFloat(s);return isNaN(n)?s:n};"
           "rows.sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*(up?1:-1)});"
           "rows.forEach(r=>t.appendChild(r))})</script>")


def find_runs(folder):
    """Run folders (config.json) and run groups (oof_metrics.json) under `folder`, a few levels deep, links not
    followed."""
    found, stack = [], [(Path(folder), 0)]
    while stack and len(found) < MAX_RUNS:
        path, depth = stack.pop()
        if (path / "config.json").is_file() or (path / "oof_metrics.json").is_file():
            found.append(path)
        if depth < MAX_DEPTH:
            stack += [(child, depth + 1) for child in path.iterdir() if child.is_dir() and not child.is_symlink()]
    return found


def describe(run):
    """A run's flattened config, its best monitored value and epoch, and its newest test (or out-of-fold) score."""
    group = (run / "oof_metrics.json").is_file()
    config_path = run / "config.json" if (run / "config.json").is_file() else next(run.glob("fold*/config.json"),
                                                                                    run / "oof_metrics.json")
    config = read_object(config_path) if config_path.name == "config.json" else {}
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    mode, _, metric = str(trainer.get("monitor", "off")).partition(" ")
    best = best_epoch(run, mode, metric) if not group else (None, None)
    if group:
        scores = read_object(run / "oof_metrics.json")
        where = "out-of-fold"
    else:
        tested = sorted(run.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
        scores, where = (read_object(tested[-1]), tested[-1].parent.name) if tested else ({}, "")
    trial = read_object(run.parent / "trial.json")  # a run of a tune.py trial: pruned or failed ones say so
    if trial.get("state") in ("pruned", "fail"):
        where = f"{'failed' if trial['state'] == 'fail' else 'pruned'} trial" + (f" ({where})" if where else "")
    name = metric.removeprefix("val_")
    score = scores.get(name) if isinstance(scores.get(name), (int, float)) else next(
        (v for k, v in scores.items() if k != "n_samples" and isinstance(v, (int, float))), None)
    return {"run": run, "time": config_path.stat().st_mtime, "config": flatten(config), "monitor": metric,
            "best": best[0], "epoch": best[1], "score": score, "scored_on": where}


def read_object(path):
    """A JSON object read from a run folder, or {} when the file is damaged or holds something else: one odd file
    leaves its cells empty, not the table unwritten."""
    try:
        value = read_json(path)
    except UserError:
        return {}
    return value if isinstance(value, dict) else {}


def best_epoch(run, mode, metric):
    values = read_history(run / "history.csv").get(metric, [])
    if mode not in ("min", "max") or not values:
        return None, None
    epoch, value = (min if mode == "min" else max)(values, key=lambda p: p[1])
    return value, int(epoch)


PLACES = ("name", "trainer.save_dir")  # where a run was saved, not how it trained


def changes(runs):
    """For each run, the config keys it has whose values differ between the runs, as `key=value`."""
    keys = sorted({k for r in runs for k in r["config"]} - set(PLACES))
    differing = [k for k in keys if len({repr(r["config"].get(k)) for r in runs}) > 1]
    return [" ".join(f"{k}={r['config'][k]}" for k in differing if k in r["config"]) for r in runs]


def table_rows(folder, runs):
    header = ["run", "monitor", "best", "epoch", "score", "scored on", "changed"]
    rows = [[str(r["run"].relative_to(folder)) if r["run"] != Path(folder) else ".", r["monitor"],
             cell(r["best"]), cell(r["epoch"]), cell(r["score"]), r["scored_on"], change]
            for r, change in zip(runs, changes(runs))]
    return header, rows


def cell(value):
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv=None):
    parser = ArgumentParser(description="Table of an experiment's runs (also written as runs.html).")
    parser.add_argument("folder", help="an experiment folder (saved/<name>), a run group or a study folder")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    try:
        if not folder.is_dir():
            raise UserError(f"{args.folder}: {'not a folder' if folder.exists() else 'no such folder'}")
        runs = sorted((describe(run) for run in find_runs(folder)), key=lambda r: r["time"], reverse=True)
        if not runs:
            raise UserError(f"{args.folder}: no runs in it (folders with config.json)")
        header, rows = table_rows(folder, runs)
        widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
        for row in [header, *rows]:
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        html_rows = "".join("<tr>" + "".join(f"<td>{esc(x)}</td>" for x in row) + "</tr>" for row in rows)
        table = f"<table><tr>{''.join(f'<th>{esc(h)}</th>' for h in header)}</tr>{html_rows}</table>"
        write_text(page(f"Runs of {folder}", [f"<h1>Runs of {esc(folder)}</h1>", table, SORTING]),
                   folder / "runs.html")
    except UserError as e:
        print(error_line(e), file=sys.stderr)
        return Outcome(2)
    return Outcome(0, out=folder / "runs.html")


if __name__ == "__main__":
    sys.exit(main())
