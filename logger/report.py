"""report.html: one self-contained page per evaluation (test.py) or out-of-fold set (train.py --folds all), with
learning curves, per-class scores, confusion matrix, reliability diagram and the most confidently wrong images.
Charts are inline SVG written here, images embedded PNG: no package beyond the core, nothing fetched when opened."""
import base64
import csv
import html
import math
from pathlib import Path

import torch

from utils.files import open_regular
from utils.util import write_text

MAX_HISTORY_ROWS = 10_000
MAX_MATRIX_CLASSES = 30
MAX_POINTS = 2_000
N_WRONG = 12
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
STYLE = ("body{font-family:sans-serif;margin:2em;color:#222}h2{border-bottom:1px solid #ccc}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}"
         "td:last-child{text-align:left}th{background:#f3f3f3;cursor:pointer}"
         ".wrong{display:inline-block;margin:6px;text-align:center;font-size:12px}"
         ".wrong img{width:96px;image-rendering:pixelated;border:1px solid #ccc}svg{margin:6px}")


def report_from_test(out, checkpoints, task, probabilities, targets, data_loader):
    """report.html in `out` for test.py's predictions; `targets` None when the data has no labels."""
    dataset, rows = data_loader.dataset, data_loader.sampler.indices.tolist()
    ids = [dataset.ids[i] for i in rows] if hasattr(dataset, "ids") else rows
    samples = getattr(dataset, "dataset", dataset)  # unseeded: a thumbnail needs no augmentation seed
    histories = {str(Path(p).parent): Path(p).parent / "history.csv" for p in checkpoints}
    write_report(out / "report.html", f"Evaluation of {', '.join(map(str, checkpoints))[:300]}", task,
                 probabilities, targets, ids, histories, image=lambda k: samples[rows[k]][0])


def report_from_out_of_fold(group_dir, task):
    """report.html in a --folds run group for its oof.csv (id, target columns, probabilities)."""
    with open(group_dir / "oof.csv", newline="") as f:
        table = list(csv.reader(f))
    n_targets = len(task.target_columns)
    values = torch.tensor([[float(x) for x in row[1:]] for row in table[1:]], dtype=torch.float64)
    targets = values[:, :n_targets]
    targets = targets.long().squeeze(1) if task.kind == "multiclass" and n_targets == 1 else targets
    histories = {fold.name: fold / "history.csv" for fold in sorted(group_dir.glob("fold*/"))}
    write_report(group_dir / "report.html", f"Out-of-fold predictions of {group_dir}", task,
                 values[:, n_targets:], targets, [row[0] for row in table[1:]], histories)


def write_report(path, title, task, probabilities, targets, ids, histories, image=None):
    """The page: learning curves of each run in `histories` (name: history.csv), then what the task's kind allows."""
    probabilities = probabilities.double()
    parts = [f"<h1>{esc(title)}</h1>", "<h2>Learning curves</h2>"]
    for name, history in histories.items():
        parts += [f"<h3>{esc(name)}</h3>", learning_curves(read_history(history))]
    if targets is None:
        parts.append("<h2>Predictions</h2><p>The data has no labels: no scores.</p>")
    elif task.kind == "regression":
        parts += ["<h2>Predicted against true</h2>"] + [
            scatter(targets.reshape(len(targets), -1)[:, j].double(), probabilities[:, j], column)
            for j, column in enumerate(task.target_columns)]
    elif task.kind == "multilabel":
        parts += multilabel_sections(probabilities, targets.double(), task.columns)
    else:
        targets = targets.reshape(len(targets), -1)
        for h, ((column, classes), segment) in enumerate(zip(task.heads, task.segments)):
            p = probabilities[:, segment]
            if task.is_value(h):
                parts += [f"<h2>Predicted against true ({esc(column)})</h2>",
                          scatter(targets[:, h].double(), p[:, 0], column)]
                continue
            names = [str(c) for c in classes] if classes else [str(i) for i in range(p.shape[1])]
            parts += multiclass_sections(p, targets[:, h].long(), names, column if len(task.heads) > 1 else "",
                                         ids, image if len(task.heads) == 1 else None)
    write_text(page(title, parts), path)


def page(title, parts):
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def esc(text):
    return html.escape(str(text), quote=True)


def read_history(path):
    """history.csv as {column: [(epoch, value)]}, numbers only (an epoch without validation has empty cells); a
    missing or unreadable file gives nothing."""
    try:
        with open_regular(path, "r", newline="") as f:  # a run folder is data: no FIFO or device
            rows = [row for _, row in zip(range(MAX_HISTORY_ROWS), csv.DictReader(f))]
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    series = {}
    for row in rows:
        epoch = number(row.get("epoch"))
        for key, value in row.items():
            if key and key != "epoch" and epoch is not None and number(value) is not None:
                series.setdefault(key, []).append((epoch, number(value)))
    return series


def number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def learning_curves(series):
    """Losses on one chart, the other metrics on another, learning rates on a third."""
    if not series:
        return "<p>No history.csv for this run.</p>"
    groups = [("loss", [k for k in series if "loss" in k]),
              ("metrics", [k for k in series if "loss" not in k and not k.startswith("lr")]),
              ("learning rate", [k for k in series if k.startswith("lr")])]
    return "".join(line_chart({k: series[k] for k in keys}, title) for title, keys in groups if keys)


def line_chart(series, title, width=420, height=260, square=False):
    """Lines through (x, y) points, with a legend; `square` draws the y = x diagonal over [0, 1]."""
    points = [p for values in series.values() for p in values] + ([(0, 0), (1, 1)] if square else [])
    x0, x1, y0, y1 = axes_range(points)
    sx, sy = scale(x0, x1, 50, width - 10), scale(y0, y1, height - 30, 20)
    body = [frame(width, height, title, x0, x1, y0, y1)]
    if square:
        body.append(f"<line x1='{sx(0)}' y1='{sy(0)}' x2='{sx(1)}' y2='{sy(1)}' stroke='#999' stroke-dasharray='4'/>")
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        body.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{path}'/>")
        body += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='{colour}'/>" for x, y in values[:200]]
        body.append(f"<text x='{width - 12}' y='{34 + 14 * i}' text-anchor='end' fill='{colour}' "
                    f"font-size='11'>{esc(name)}</text>")
    return svg(width, height, body)


def axes_range(points):
    xs, ys = [x for x, _ in points] or [0, 1], [y for _, y in points] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return x0, x1 if x1 > x0 else x0 + 1, y0, y1 if y1 > y0 else y0 + 1


def scale(low, high, start, end):
    return lambda v: start + (v - low) / (high - low) * (end - start)


def frame(width, height, title, x0, x1, y0, y1):
    return (f"<rect x='50' y='20' width='{width - 60}' height='{height - 50}' fill='#fafafa' stroke='#bbb'/>"
            f"<text x='{width / 2}' y='14' text-anchor='middle' font-size='13'>{esc(title)}</text>"
            f"<text x='46' y='{height - 30}' text-anchor='end' font-size='10'>{y0:.3g}</text>"
            f"<text x='46' y='28' text-anchor='end' font-size='10'>{y1:.3g}</text>"
            f"<text x='50' y='{height - 16}' font-size='10'>{x0:.3g}</text>"
            f"<text x='{width - 10}' y='{height - 16}' text-anchor='end' font-size='10'>{x1:.3g}</text>")


def svg(width, height, body):
    return f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>{''.join(body)}</svg>"


def multiclass_sections(probabilities, targets, names, head, ids, image):
    """Per-class precision, recall and F1, the confusion matrix, a reliability diagram, the most confidently wrong."""
    n = probabilities.shape[1]
    predicted = probabilities.argmax(1)
    matrix = torch.bincount(targets * n + predicted, minlength=n * n).reshape(n, n)
    suffix = f" ({esc(head)})" if head else ""
    parts = [f"<h2>Scores per class{suffix}</h2>", class_table(matrix, names),
             f"<h2>Confusion matrix{suffix}</h2>", confusion_svg(matrix, names),
             f"<h2>Reliability{suffix}</h2>", reliability(probabilities.max(1).values, predicted == targets)]
    if image is not None:
        parts += ["<h2>Most confidently wrong</h2>", confidently_wrong(probabilities, targets, names, ids, image)]
    return parts


def class_table(matrix, names):
    true_positive = matrix.diag().double()
    precision = true_positive / matrix.sum(0).clamp(min=1)
    recall = true_positive / matrix.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    rows = "".join(f"<tr><td>{esc(name)}</td><td>{p:.4f}</td><td>{r:.4f}</td><td>{f:.4f}</td><td>{s}</td></tr>"
                   for name, p, r, f, s in zip(names, precision.tolist(), recall.tolist(), f1.tolist(),
                                               matrix.sum(1).tolist()))
    return ("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            f"{rows}</table>")


def confusion_svg(matrix, names):
    """Rows true, columns predicted; with many classes, those with the most samples."""
    keep = matrix.sum(1).argsort(descending=True)[:MAX_MATRIX_CLASSES].sort().values
    sub = matrix[keep][:, keep]
    cell, left = 22, 90
    size = left + cell * len(keep) + 10
    peak = max(int(sub.max()), 1)
    body = [f"<text x='{left}' y='12' font-size='11'>predicted →</text>"]
    for i, row in enumerate(sub.tolist()):
        y = left + i * cell
        body.append(f"<text x='{left - 4}' y='{y + 15}' text-anchor='end' font-size='10'>"
                    f"{esc(names[keep[i]])[:14]}</text>")
        for j, count in enumerate(row):
            shade = int(255 - 200 * count / peak)
            body.append(f"<rect x='{left + j * cell}' y='{y}' width='{cell}' height='{cell}' "
                        f"fill='rgb({shade},{shade},255)' stroke='#fff'/>")
            if count:
                body.append(f"<text x='{left + j * cell + cell / 2}' y='{y + 15}' text-anchor='middle' "
                            f"font-size='9'>{count}</text>")
    for j, k in enumerate(keep.tolist()):
        x = left + j * cell + 14
        body.append(f"<text x='{x}' y='{left - 4}' font-size='10' transform='rotate(-60 {x} {left - 4})'>"
                    f"{esc(names[k])[:14]}</text>")
    note = "" if len(keep) == len(names) else f"<p>The {len(keep)} classes with the most samples.</p>"
    return note + svg(size, size, body)


def reliability(confidence, correct, n_bins=10):
    """How often the prediction is right (multilabel: the label present) against the predicted probability, in
    equal-width bins, and the expected calibration error."""
    bins = (confidence * n_bins).long().clamp(max=n_bins - 1)
    points, error = [], 0.0
    for b in range(n_bins):
        chosen = bins == b
        if chosen.any():
            accuracy, mean = correct[chosen].double().mean().item(), confidence[chosen].mean().item()
            points.append((mean, accuracy))
            error += chosen.sum().item() / len(confidence) * abs(accuracy - mean)
    chart = line_chart({"observed frequency": points}, "reliability", square=True)
    return f"<p>Expected calibration error: {error:.4f}</p>{chart}"


def confidently_wrong(probabilities, targets, names, ids, image):
    wrong = (probabilities.argmax(1) != targets).nonzero().flatten()
    order = wrong[probabilities[wrong].max(1).values.argsort(descending=True)][:N_WRONG]
    cards = []
    for k in order.tolist():
        top = probabilities[k].topk(min(3, probabilities.shape[1]))
        guesses = "<br>".join(f"{esc(names[c])}: {p:.3f}" for p, c in zip(top.values.tolist(), top.indices.tolist()))
        cards.append(f"<div class='wrong'><img alt='{esc(ids[k])}' src='data:image/png;base64,{png(image(k))}'><br>"
                     f"{esc(ids[k])}<br>true: {esc(names[targets[k]])}<br>{guesses}</div>")
    return "".join(cards) or "<p>None wrong.</p>"


def png(image):
    """An image (a (C, H, W) tensor or a PIL image), stretched to its own value range, as base64 PNG."""
    from torchvision.io import encode_png
    from torchvision.transforms.v2.functional import to_image

    image = (image if isinstance(image, torch.Tensor) else to_image(image)).detach().float().cpu()
    image = image[:3 if image.shape[0] >= 3 else 1]
    image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-5)
    return base64.b64encode(encode_png((image * 255).round().to(torch.uint8)).numpy().tobytes()).decode()


def multilabel_sections(probabilities, targets, labels):
    """F1 against the threshold per label, and a reliability diagram over all labels' probabilities."""
    thresholds = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    curves = {}
    for j, label in enumerate(labels[:len(COLOURS)]):
        predicted = probabilities[:, j:j + 1] >= thresholds
        truth = targets[:, j:j + 1].bool()
        tp = (predicted & truth).sum(0).double()
        f1 = 2 * tp / (predicted.sum(0) + truth.sum(0)).clamp(min=1)
        curves[label] = list(zip(thresholds.tolist(), f1.tolist()))
    shown = "" if len(labels) <= len(COLOURS) else f"<p>The first {len(COLOURS)} labels.</p>"
    confidence = probabilities.flatten()
    return ["<h2>F1 against the threshold</h2>", shown, line_chart(curves, "F1 per label"),
            "<h2>Reliability</h2>", reliability(confidence, targets.flatten().bool())]


def scatter(true, predicted, column, size=320):
    stride = max(1, len(true) // MAX_POINTS)
    points = list(zip(true[::stride].tolist(), predicted[::stride].tolist()))
    x0, x1, y0, y1 = axes_range(points + [(min(true.min().item(), predicted.min().item()),) * 2])
    sx, sy = scale(x0, x1, 50, size - 10), scale(y0, y1, size - 30, 20)
    body = [frame(size, size, f"{column}: predicted (y) against true (x)", x0, x1, y0, y1)]
    body += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2' fill='{COLOURS[0]}' opacity='0.6'/>"
             for x, y in points]
    return svg(size, size, body)
