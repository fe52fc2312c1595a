"""CSV files drawn at random (names, encodings, sizes, quoting): each one loads, or is one line naming the file."""
import csv
import io
import shutil

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from data_loader.data_loaders import CsvImageDataLoader
from data_loader.datasets import is_relative_name, read_csv
from tests.helpers import DATA, read_csv_rows
from utils.util import UserError, error_line

IMAGES = [row["id"] for row in read_csv_rows(DATA / "train.csv")[:4]]
NAMES = st.one_of(st.sampled_from(["id", "label", "site", "", " id", "ID", "label\n", "a,b", '"q"', "é", "\x00"]),
                  st.text(max_size=8))
CELLS = st.one_of(st.sampled_from(IMAGES), st.sampled_from(["", " ", "0", "07", "1.5", "nan", "NA", "../x", "/etc",
                                                            "a\nb", "a\\b", "\x7f", "é", "1_000", "1e400"]),
                  st.text(max_size=6))
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"])


@st.composite
def csv_files(draw):
    """The bytes of a CSV: a header of drawn names (often id and label), rows of drawn cells and of drawn lengths."""
    header = draw(st.one_of(st.just(["id", "label"]), st.lists(NAMES, max_size=5)))
    width = st.integers(0, len(header) + 1) if draw(st.booleans()) else st.just(len(header))
    rows = draw(st.lists(width.flatmap(lambda n: st.lists(CELLS, min_size=n, max_size=n)), max_size=6))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerows([header, *rows] if header or draw(st.booleans()) else rows)
    try:
        return text.getvalue().encode(draw(ENCODINGS))
    except UnicodeEncodeError:
        return text.getvalue().encode("utf-8", "surrogatepass")


def one_line(error, path=""):
    """Whether the error is the one line the scripts print (naming `path` first), with nothing but a message, and
    nothing a terminal would act on (a NUL, an escape sequence) however the file is written."""
    line = error_line(error)
    return line.startswith(f"error: {path}") and "Traceback" not in line and len(line) < 2000 and line.isprintable()


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(data=csv_files())
@example(data=b"id,label\n" + b",".join([b"x"] * 40_000) + b"\n")
@example(data=",".join(["id", "label", *(f"c{i}" for i in range(40_000))]).encode() + b"\nx,1" + b",0" * 40_000)
@example(data="id,l\nx,1\n".encode("utf-16"))
@example(data=b'"a\nb",label\nx,1\n')
@example(data=b"\xef\xbb\xbf\xef\xbb\xbfid,label\x1b[2K\nx,1\n")
def test_a_drawn_csv_loads_or_is_one_line_naming_it(tmp_path, data):
    path = tmp_path / "train.csv"
    path.write_bytes(data)
    try:
        table = read_csv(path, "id", required=("label",))
    except UserError as e:
        assert one_line(e, path), str(e)
        return
    assert len(set(map(len, table.values()))) == 1 and len(table.lines) == len(table["id"])
    assert len(set(table["id"])) == len(table["id"]) and all(map(is_relative_name, table["id"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=csv_files())
@example(data=("id,label\n" + "".join(f"{i},{n}\n" for n, i in enumerate(IMAGES))).encode())
def test_a_drawn_training_csv_trains_or_is_one_line(tmp_path_factory, data):
    """The loader as train.py builds it, on a drawn train.csv beside a few real images."""
    folder = tmp_path_factory.mktemp("drawn")
    shutil.copytree(DATA / "train", folder / "train", ignore=lambda _, names: [n for n in names
                                                                              if n[:-4] not in IMAGES])
    (folder / "train.csv").write_bytes(data)
    try:
        loader = CsvImageDataLoader(folder, batch_size=2, validation_split=0, cache=False)
    except UserError as e:
        assert one_line(e), str(e)
        return
    assert len(loader.dataset) >= 1
