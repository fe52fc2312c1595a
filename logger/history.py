"""history.csv: one row per epoch, with the learning rate the epoch started with, kept in step with the checkpoints."""
import csv
import io

from utils.util import write_text


def rate_columns(lr, param_groups):
    """The columns of an epoch's learning rate: `lr`, or `lr_<group>` per parameter group (its name, else its index)
    where `lr` is a list of one rate per group."""
    if not isinstance(lr, list):
        return {"lr": lr}
    return {f"lr_{group.get('name', i)}": rate for i, (group, rate) in enumerate(zip(param_groups, lr))}


def trim_history(path, start_epoch):
    """Drop the rows of epochs from `start_epoch` on, which the checkpoint resumed does not include (a crash after
    the row was written, before the save)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < start_epoch]
        if len(kept) < len(lines):
            write_text("".join(kept), path)


def append_row(path, row):
    """Append `row` to a CSV file; when its keys differ from the file's columns (a run resumed with other metrics),
    the file is first rewritten with the columns of both, so every value stays under its own name."""
    header = None
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
    if header is not None and not row.keys() <= set(header):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = list(dict.fromkeys([*header, *row]))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(text.getvalue(), path)
        header = columns
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or list(row))
        if header is None:
            writer.writeheader()
        writer.writerow(row)
