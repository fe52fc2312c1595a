"""The image data path: reading the CSV, the decoded-image cache kept between runs, the transforms, and which heavy
packages a run imports before its first batch."""
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from base import BaseDataLoader
from base.base_data_loader import available_cpus
from data_loader import images
from data_loader.data_loaders import CsvImageDataLoader, image_transform
from data_loader.datasets import CsvImageDataset, label_text, read_csv, typed
from tests.helpers import DATA, REPO, error_line, evaluate, fails, read_csv_rows, write_config
from utils.util import UserError


def test_csv_keeps_id_strings_and_reads_integer_labels_as_numbers(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,label,site\n007,10,a\n010,2,b\n\n011,2,a\n")
    table = read_csv(path, "id")
    assert table == {"id": ["007", "010", "011"], "label": [10, 2, 2], "site": ["a", "b", "a"]}
    assert sorted(set(table["label"])) == [2, 10]  # numeric order, not "10" < "2"


def test_csv_columns_of_decimals_are_typed_others_kept_as_written_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,score,flag,label,code\r\n1,10.0,True, 2,07\r\n   \r\n2,2.5,false,10,10\r\n")
    assert read_csv(path, "id") == {"id": ["1", "2"], "score": [10.0, 2.5], "flag": ["True", "false"],
                                    "label": [2, 10], "code": ["07", "10"]}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.from_regex(r" ?[+-]?[0-9]{0,3}\.?[0-9]{0,2}([eE][+-]?[0-9])? ?|nan|inf|True|false", fullmatch=True),
                min_size=1, max_size=4))
@example(["07", "08", "10"])
@example(["2.50", "1"])
@example(["true", "false"])
@example(["1" * 400, "2"])
def test_a_column_read_as_numbers_writes_back_as_read(values):
    """Labels reach predictions.csv as str() of the typed value: a column is converted only if that gives its text."""
    column = typed(values)
    assert column == values or [label_text(v) for v in column] == [v.strip() for v in values]


@pytest.mark.parametrize("text, expected", [
    ("id,label\n1,3\n2,4,5\n", "train.csv: line 3 has 3 fields, expected 2 like the header"),
    ("id,label\n1,3\n2,\n", "train.csv: line 3 has no value in column 'label'"),
    ("", "train.csv: not a readable CSV (no header line)"),
    ("name,label\n1,3\n", "train.csv: no column 'id' (columns: name, label)"),
    ("id,label,label\n1,3,4\n", "train.csv: the header names 'label' more than once"),
    ("id,label\n", "train.csv: no rows below the header"),
    ("id,label\n1,3\n2, \n", "train.csv: line 3 has no value in column 'label'"),
])
def test_a_malformed_csv_is_one_line_naming_the_file_and_line(tmp_path, text, expected):
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        read_csv(path, "id", required=("label",))
    assert str(caught.value) == f"{path}: {expected.split(': ', 1)[1]}"


@pytest.mark.parametrize("mode", ["unchanged", "gray", "rgb", "rgb_alpha"])
def test_both_image_readers_give_torchvisions_pixels_for_png_and_jpeg(mode, tmp_path):
    """TorchCodec (when it loads) and Pillow read PNG and JPEG files to the same tensors as torchvision did."""
    import numpy as np
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    rng = np.random.default_rng(0)
    files = {"png-gray": Image.fromarray(rng.integers(0, 255, (9, 7), dtype=np.uint8)),
             "png-rgba": Image.fromarray(rng.integers(0, 255, (9, 7, 4), dtype=np.uint8)),
             "jpeg-rgb": Image.fromarray((np.linspace(0, 250, 9 * 7 * 3).reshape(9, 7, 3)).astype(np.uint8))}
    readers = ["pillow"] + (["torchcodec"] if images.default_reader() == "torchcodec" else [])
    for name, image in files.items():
        if name.startswith("jpeg") and mode.endswith("alpha"):
            continue  # JPEG has no alpha channel to give
        buffer = io.BytesIO()
        image.save(buffer, format=name.split("-")[0].upper())
        data = buffer.getvalue()
        expected = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode[mode.upper()])
        for reader in readers:
            got = images.decode(data, mode, reader)
            assert got.dtype == torch.uint8 and got.shape == expected.shape, (name, reader)
            converted = mode != "unchanged" and name != f"png-{mode}"  # Pillow rounds colour-to-gray differently
            tolerance = 2 if name.startswith("jpeg") else 1 if converted else 0
            assert (got.int() - expected.int()).abs().max() <= tolerance, (name, reader)


def test_both_image_readers_give_one_pixel_semantics_for_exif_cmyk_16_bit_palette_and_alpha():
    """EXIF orientation applied, CMYK to RGB, 16 bits to their high byte, a palette to RGB (RGBA with transparency),
    alpha kept by the modes that have it and dropped by the others; both readers give the same uint8 pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8))
    deep = rng.integers(0, 65535, (16, 24), dtype=np.uint16)
    exif = rgb.getexif()
    exif[0x0112] = 6  # stored 24 wide, shown rotated: 16 wide, 24 high
    files = {"exif.jpeg": (rgb, "JPEG", {"exif": exif}), "exif.png": (rgb, "PNG", {"exif": exif}),
             "cmyk.jpeg": (rgb.convert("CMYK"), "JPEG", {}),
             "16bit.png": (Image.fromarray(deep), "PNG", {}), "palette.png": (rgb.convert("P"), "PNG", {}),
             "palette-alpha.png": (rgb.convert("P"), "PNG", {"transparency": 0}),
             "rgba.png": (rgb.convert("RGBA"), "PNG", {}), "gray-alpha.png": (rgb.convert("LA"), "PNG", {})}
    readers = ["pillow"] + (["torchcodec"] if images.default_reader() == "torchcodec" else [])
    own = {}
    for name, (image, form, options) in files.items():
        buffer = io.BytesIO()
        image.save(buffer, format=form, **options)
        for mode in images.MODES:
            decoded = [images.decode(buffer.getvalue(), mode, reader) for reader in readers]
            assert all(d.dtype == torch.uint8 and torch.equal(d, decoded[0]) for d in decoded), (name, mode)
        own[name] = images.decode(buffer.getvalue(), "unchanged")
        assert torch.equal(images.decode(buffer.getvalue(), "rgb"), images.decode(buffer.getvalue(), "rgba")[:3]), name
    assert {name: list(image.shape) for name, image in own.items()} == {
        "exif.jpeg": [3, 24, 16], "exif.png": [3, 24, 16], "cmyk.jpeg": [3, 16, 24], "16bit.png": [1, 16, 24],
        "palette.png": [3, 16, 24],
        "palette-alpha.png": [4, 16, 24], "rgba.png": [4, 16, 24], "gray-alpha.png": [2, 16, 24]}
    assert torch.equal(own["16bit.png"][0], torch.from_numpy((deep >> 8).astype(np.uint8)))


def test_bytes_that_are_no_image_are_a_value_error_for_both_readers():
    for reader in ("pillow", "torchcodec")[: 2 if images.default_reader() == "torchcodec" else 1]:
        with pytest.raises(ValueError):
            images.decode(b"not an image at all", "unchanged", reader)


@pytest.fixture
def warnings_seen(caplog):
    """The project's warnings (its logger does not propagate to the root logger that caplog listens to)."""
    logger = logging.getLogger("template")
    propagate, logger.propagate = logger.propagate, False
    caplog.handler.setLevel(logging.WARNING)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


def images_of(dataset):
    return [dataset[i][0] for i in range(len(dataset))]


@pytest.fixture
def small_data(tmp_path):
    """Twenty training images copied (with train.csv) into a folder of their own, which tests may modify."""
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    lines = (DATA / "train.csv").read_text().splitlines()[:21]
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    for line in lines[1:]:
        name = line.split(",")[0] + ".png"
        shutil.copy2(DATA / "train" / name, folder / "train" / name)
    return folder


def dataset(folder, cache_dir, **kwargs):
    """The dataset as a run makes it: built, then its decoded-image cache written once the run has begun."""
    built = CsvImageDataset(folder / "train.csv", folder / "train", classes=list(range(10)), cache_dir=cache_dir,
                            **kwargs)
    built.write_cache()
    return built


def test_a_second_run_takes_the_decoded_images_from_the_cache_without_decoding(small_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = dataset(small_data, cache)
    assert len(list(cache.glob("train-unchanged-*.pt"))) == 1

    def no_decoding(self, index):
        raise AssertionError("decoded although the cache is up to date")

    monkeypatch.setattr(CsvImageDataset, "read", no_decoding)
    second = dataset(small_data, cache)
    assert all(torch.equal(a, b) for a, b in zip(images_of(first), images_of(second), strict=True))
    assert [second[i][1] for i in range(len(second))] == [first[i][1] for i in range(len(first))]


def test_a_changed_image_or_another_mode_decodes_again(small_data, tmp_path):
    cache = tmp_path / "cache"
    before = dataset(small_data, cache)[0][0]
    other_id = (DATA / "train.csv").read_text().splitlines()[30].split(",")[0]  # not among the twenty
    first_file = small_data / "train" / f"{read_csv(small_data / 'train.csv', 'id')['id'][0]}.png"
    shutil.copyfile(DATA / "train" / f"{other_id}.png", first_file)
    after = dataset(small_data, cache)[0][0]
    assert not torch.equal(after, before)
    assert torch.equal(after, dataset(small_data, None)[0][0])

    rgb = dataset(small_data, cache, image_mode="rgb")
    assert rgb[0][0].shape[0] == 3
    assert len(list(cache.glob("*.pt"))) == 2  # one file per image mode; the other one was rewritten in place


def test_an_image_replaced_with_its_size_and_time_kept_decodes_again(tmp_path):
    """As after `cp -p` or `rsync -a`: same name, same size, same modification time, other pixels."""
    from torchvision.io import write_png

    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    (folder / "train.csv").write_text("id,label\na,0\n")
    image = folder / "train" / "a.png"
    dots = []
    for column in (10, 11):
        dot = torch.zeros(1, 28, 28, dtype=torch.uint8)
        dot[0, 14, column] = 255
        dots.append(dot)
    write_png(dots[0], str(image))
    cache = tmp_path / "cache"
    assert torch.equal(dataset(folder, cache)[0][0], dots[0])
    before = image.stat()
    write_png(dots[1], str(image))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert image.stat().st_size == before.st_size and image.stat().st_mtime_ns == before.st_mtime_ns
    assert torch.equal(dataset(folder, cache)[0][0], dots[1])


def test_the_cache_file_is_readable_by_others(small_data, tmp_path):
    dataset(small_data, tmp_path / "cache")
    (path,) = (tmp_path / "cache").glob("*.pt")
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_an_unreadable_cache_file_is_rebuilt_with_a_warning(small_data, tmp_path, warnings_seen):
    cache = tmp_path / "cache"
    reference = images_of(dataset(small_data, cache))
    (path,) = cache.glob("*.pt")
    path.write_bytes(b"not a cache")
    rebuilt = images_of(dataset(small_data, cache))
    assert all(torch.equal(a, b) for a, b in zip(reference, rebuilt, strict=True))
    (message,) = warnings_seen.messages
    assert "unreadable" in message and path.name in message and "\n" not in message
    assert torch.load(path, weights_only=True)["signature"]  # written again, loadable without pickle code


def test_a_cache_folder_that_cannot_be_written_only_warns(small_data, tmp_path, warnings_seen):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    images = images_of(dataset(small_data, blocked / "cache"))
    assert len(images) == 20
    (message,) = warnings_seen.messages
    assert "not written" in message


def test_images_too_large_for_memory_are_read_from_the_files_instead(small_data, tmp_path, monkeypatch, caplog):
    from data_loader import image_cache

    monkeypatch.setattr(image_cache, "memory_available", lambda: 1000)  # bytes: less than twenty 28x28 images
    logger = logging.getLogger("template")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="template"):
            streamed = dataset(small_data, tmp_path / "cache")
    finally:
        logger.removeHandler(caplog.handler)
    assert streamed.images is None and not (tmp_path / "cache").exists()
    (line,) = {m for m in caplog.messages if m.startswith("decoded images:")}  # (caplog may also see it via root)
    assert "read every epoch" in line
    assert all(torch.equal(a, b) for a, b in zip(images_of(streamed), images_of(dataset(small_data, None))))


def test_images_decoded_in_parallel_are_those_decoded_one_by_one(small_data, tmp_path, monkeypatch):
    from data_loader import image_cache

    one_by_one = images_of(dataset(small_data, None))
    monkeypatch.setattr(image_cache, "PARALLEL_FROM", 1)
    monkeypatch.setattr(image_cache, "CHUNK", 3)
    assert all(torch.equal(a, b) for a, b in zip(images_of(dataset(small_data, None)), one_by_one, strict=True))


def test_kept_images_are_one_mapped_file_and_without_cache_dir_nothing_stays_on_disk(small_data, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    kept = dataset(small_data, None)
    assert kept.stacked is not None and kept.stacked.shape == (20, 1, 28, 28)
    address = kept.stacked.data_ptr()
    with open("/proc/self/maps") as maps:  # the pages of a file (since deleted), shared with workers, not copied
        (mapping,) = [line for line in maps if int(line.split("-")[0], 16) <= address < int(line.split()[0].split(
            "-")[1], 16)]
    assert "(deleted)" in mapping and str(tmp_path / "scratch") in mapping
    assert list((tmp_path / "scratch").iterdir()) == []


def test_cache_dir_without_cache_is_an_error(small_data, tmp_path):
    with pytest.raises(UserError, match="data_loader.args.cache_dir: needs cache true"):
        CsvImageDataLoader(small_data, batch_size=4, cache=False, cache_dir=str(tmp_path / "cache"))


def test_scaling_and_normalisation_match_torchvisions():
    from torchvision.transforms import v2

    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.2]
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    torch.testing.assert_close(image_transform([], mean, std, "eval_transforms")(image), reference(image))
    flipped = image_transform([{"type": "RandomHorizontalFlip", "args": {"p": 1.0}}], None, None, "train_transforms")
    torch.testing.assert_close(flipped(image), image.flip(-1).float() / 255)


STARTUP_MODULES = """
import sys
import train
code = train.main(["-c", sys.argv[1], "-o", "trainer.epochs=1", "-o", "trainer.limit_train_batches=1"])
print("imported:", ",".join(sorted({m.split(".")[0] for m in sys.modules} & {"pandas", "torchvision", "PIL",
                                                                             "torchcodec"})))
sys.exit(code)
"""


def test_16_bit_images_are_scaled_by_their_own_maximum():
    from torchvision.transforms import v2

    image = torch.tensor([[[0, 1000, 65535]]], dtype=torch.uint16)
    torch.testing.assert_close(image_transform([], None, None, "eval_transforms")(image),
                               v2.ToDtype(torch.float32, scale=True)(image))


@pytest.mark.parametrize("mean, std, culprit", [(["0.5"], [0.2], "mean"), ([0.5], [0], "std"), ([], [], "mean")])
def test_mean_and_std_must_be_numbers(mean, std, culprit):
    with pytest.raises(UserError, match=f"data_loader.args.{culprit}: expected a list of finite numbers"):
        image_transform([], mean, std, "eval_transforms")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_an_image_grid_of_any_image_mode(tmp_path, channels):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from logger.visualization import TensorboardWriter

    writer = TensorboardWriter(tmp_path, enabled=True)
    writer.add_image_grid("train/images", torch.rand(10, channels, 6, 5), 1)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    (grid,) = events.Images("train/images")
    assert (grid.width, grid.height) == (8 * 5, 2 * 6)


@pytest.mark.slow
def test_a_run_with_a_warm_cache_imports_neither_torchvision_nor_pandas(config, tmp_path):
    """Heavy packages load only where they are used: the image reader to decode (a cold cache) or to check a few
    images against a warm one, torchvision for configured transforms, pandas for CSV output."""
    config["data_loader"]["args"]["cache_dir"] = str(tmp_path / "cache")
    path = write_config(config, tmp_path / "config.json")
    imported = []
    for _ in ("cold", "warm"):
        proc = subprocess.run([sys.executable, "-c", STARTUP_MODULES, str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        imported.append(proc.stdout.split("imported:")[-1].strip())
    reader = {"torchcodec": "PIL,torchcodec", "pillow": "PIL"}[images.default_reader()]  # headers read by Pillow
    assert imported == [reader, reader]  # the warm run decodes the few images it compares with the cache


def test_cache_dir_on_the_command_line_with_cache_off_is_one_line(config, tmp_path, capsys):
    line = fails(config, tmp_path, capsys, "-o", "data_loader.args.cache=false",
                 "-o", f"data_loader.args.cache_dir={tmp_path / 'cache'}")
    assert "data_loader.args.cache_dir" in line


# --- ids, labels and classes ----------------------------------------------------------------------------------------

def with_csv(folder, rows, name="train.csv", header="id,label"):
    """`folder/name` holding `header` and `rows` (tuples of fields); returns the path."""
    path = folder / name
    path.write_text(header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows))
    return path


def relabelled(folder, spell):
    """The folder's train.csv with every digit label d written as spell(d); returns the labels as written."""
    rows = [(r["id"], spell(int(r["label"]))) for r in read_csv_rows(folder / "train.csv")]
    with_csv(folder, rows)
    return rows


@pytest.mark.parametrize("image_id", ["../outside", "/etc/passwd", "a\\b", "a\x00b", '"a\nb"', ".", "..",
                                      "sub/../../x", "a//b", "a/"])
def test_an_id_that_leads_out_of_the_image_folder_is_one_line_naming_the_csv_line_and_id(small_data, image_id):
    rows = read_csv_rows(small_data / "train.csv")
    path = with_csv(small_data, [(rows[0]["id"], 1), (image_id, 2)])
    with pytest.raises(UserError) as caught:
        CsvImageDataLoader(small_data, batch_size=4)
    shown = image_id.strip('"')
    assert str(caught.value).startswith(f"{path}: line {3 + shown.count(chr(10))} has id {shown!r}, which names no "
                                        f"file inside the image folder")


def test_ids_may_be_paths_below_the_image_folder(small_data):
    """Class-per-folder layouts list ids such as `n01440764/img_10026`."""
    rows = read_csv_rows(small_data / "train.csv")
    for row in rows:
        (small_data / "train" / row["label"]).mkdir(exist_ok=True)
        (small_data / "train" / f"{row['id']}.png").rename(small_data / "train" / row["label"] / f"{row['id']}.png")
    with_csv(small_data, [(f"{r['label']}/{r['id']}", r["label"]) for r in rows])
    loader = CsvImageDataLoader(small_data, batch_size=4, validation_split=0)
    assert len(loader.dataset) == len(rows) and loader.dataset.dataset[0][0].shape == (1, 28, 28)


def test_an_image_path_through_a_file_is_one_line(small_data):
    first = read_csv_rows(small_data / "train.csv")[0]["id"]
    with_csv(small_data, [(f"{first}.png/x", 1)])
    with pytest.raises(UserError, match=rf"image '.*/{first}\.png/x\.png': cannot be read \(Not a directory\)"):
        CsvImageDataLoader(small_data, batch_size=4, validation_split=0)


@pytest.mark.parametrize("spell", [lambda d: f"0{d}", lambda d: f"{d}.50", lambda d: ("true", "false")[d % 2],
                                   lambda d: f"+{d}"], ids=["zero-padded", "trailing-zero", "true-false", "signed"])
def test_labels_reach_the_submission_as_the_csv_writes_them(small_data, tmp_path, spell):
    from trainer.inference import class_names, row_ids, write_predictions
    from utils.config import validate_inference

    rows = relabelled(small_data, spell)
    with_csv(small_data, rows, "test_labels.csv")
    loader = CsvImageDataLoader(small_data, batch_size=4, training=False, validation_split=0.0,
                                test_csv="test_labels.csv", test_images="train").evaluation_loader()
    targets = loader.dataset.target_tensor
    probabilities = torch.nn.functional.one_hot(targets).float()
    write_predictions(tmp_path, row_ids(loader), probabilities, class_names(loader, probabilities.shape[1]),
                      validate_inference({"label_format": "name"}))
    assert [(r["id"], r["label"]) for r in read_csv_rows(tmp_path / "predictions.csv")] == rows


def test_classes_of_labels_that_are_all_numbers_sort_as_numbers_whatever_their_spelling(small_data):
    relabelled(small_data, lambda d: f"0{d}" if d % 2 else str(d))
    loader = CsvImageDataLoader(small_data, batch_size=4, validation_split=0)
    digits = sorted({int(r["label"]) for r in read_csv_rows(DATA / "train.csv")[:20]})
    assert loader.dataset.classes == [f"0{d}" if d % 2 else str(d) for d in digits]


def test_classes_are_matched_to_the_labels_as_written(small_data):
    """Classes given as the CSV writes them match, also with a class no row has; numbers for "07" are one line."""
    rows = relabelled(small_data, lambda d: f"0{d}")
    classes = [f"0{d}" for d in range(10)] + ["10"]
    loader = CsvImageDataLoader(small_data, batch_size=4, classes=classes, validation_split=0)
    assert [classes[t] for t in loader.dataset.targets] == [label for _, label in rows]
    with pytest.raises(UserError) as caught:
        CsvImageDataLoader(small_data, batch_size=4, classes=list(range(11)))
    label = rows[0][1]
    assert str(caught.value) == (f"{small_data / 'train.csv'}: line 2 has label {label!r}, not one of the 11 classes "
                                 f"{list(range(10))}; classes are matched as written, and {label!r} is not "
                                 f"'{int(label)}' (give it as {label!r} in data_loader.args.classes)")


@pytest.mark.parametrize("classes, expected", [
    ([], "data_loader.args.classes: expected a non-empty list of labels as the CSV writes them, got []"),
    ("0123456789", "data_loader.args.classes: expected a non-empty list"),
    ([0, 1, None], "data_loader.args.classes[2]: expected a label as the CSV writes it (text or a number), got null"),
    ([0, [1]], "data_loader.args.classes[1]: expected a label"),
    ([0, {"a": 1}], "data_loader.args.classes[1]: expected a label"),
    ([False, True], "data_loader.args.classes[0]: expected a label"),
    ([0, " "], "data_loader.args.classes[1]: expected a label"),
    ([0, 1, "1"], 'data_loader.args.classes: "1" is listed twice (entries 1 and 2); each class once'),
])
def test_a_class_list_that_is_no_list_of_distinct_labels_is_one_line(small_data, classes, expected):
    with pytest.raises(UserError) as caught:
        CsvImageDataLoader(small_data, batch_size=4, classes=classes)
    assert str(caught.value).startswith(expected)


def test_a_test_csv_with_an_empty_label_column_is_unlabelled_and_a_gap_in_one_is_one_line(small_data):
    ids = [r["id"] for r in read_csv_rows(small_data / "train.csv")]
    path = with_csv(small_data, [(i, "") for i in ids], "test.csv")
    loader = CsvImageDataLoader(small_data, batch_size=4, training=False, validation_split=0.0, test_images="train")
    assert loader.dataset.targets is None
    with_csv(small_data, [(i, 3 if n else "") for n, i in enumerate(ids)], "test.csv")
    with pytest.raises(UserError, match=f"^{path}: line 2 has no value in column 'label'"):
        CsvImageDataLoader(small_data, batch_size=4, training=False, validation_split=0.0, test_images="train")


# --- loader settings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, culprit", [
    ("data_loader.args.validation_split=0.001", "data_loader.args.validation_split: 0.001 of 300 samples holds out "
                                                "none"),
    (f"data_loader.args.num_workers={4 * available_cpus() + 1}",  # one above the bound: a few, should it pass
     f"data_loader.args.num_workers: {4 * available_cpus() + 1} worker processes"),
    ("data_loader.args.classes=[0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]", "data_loader.args.classes: 1 is listed twice"),
    ('data_loader.args.train_transforms=[{"type": "RandomCrop", "args": {"size": 64}}]',
     "data_loader.args.train_transforms[0]: RandomCrop cannot take an image of shape [1, 28, 28]: Required crop size"),
    ('data_loader.args.train_transforms=[{"type": "RandomApply", "args": {"p": 0.5, "transforms": ['
     '{"type": "RandomCrop", "args": {"size": 64}}]}}]',
     "data_loader.args.train_transforms[0]: RandomApply cannot take an image of shape [1, 28, 28]: Required crop"),
    ('data_loader.args.train_transforms=[{"type": "RandomChoice", "args": {"transforms": ['
     '{"type": "RandomHorizontalFlip"}, {"type": "RandomCrop", "args": {"size": 64}}]}}]',
     "data_loader.args.train_transforms[0]: RandomChoice cannot take an image of shape [1, 28, 28]: Required crop"),
    ('data_loader.args.train_transforms=[{"type": "RandomApply", "args": {"p": 0.5, "transforms": ['
     '{"type": "Resize", "args": {"size": 64}}]}}, {"type": "RandomCrop", "args": {"size": 48}}]',
     "data_loader.args.train_transforms[1]: RandomCrop cannot take an image of shape [1, 28, 28]: Required crop"),
])
def test_data_settings_that_cannot_work_stop_train_py_before_anything_is_written(config, tmp_path, capsys, override,
                                                                                 culprit):
    assert fails(config, tmp_path, capsys, "-o", override).startswith(f"error: {culprit}")


@pytest.mark.parametrize("args, expected", [
    ({"label_column": "id"}, "data_loader.args.label_column: 'id' is the id_column too"),
    ({"group_column": "label"}, "data_loader.args.group_column: 'label' is the label_column"),
    ({"extension": "/../../x.png"}, 'data_loader.args.extension: expected a file-name suffix such as ".png"'),
    ({"extension": ".png\x00"}, 'data_loader.args.extension: expected a file-name suffix such as ".png"'),
])
def test_columns_and_extension_that_contradict_the_layout_are_one_line(small_data, args, expected):
    with pytest.raises(UserError) as caught:
        CsvImageDataLoader(small_data, batch_size=4, **args)
    assert str(caught.value).startswith(expected)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_more_than_four_workers_per_cpu_are_refused(small_data):
    limit = 4 * available_cpus()
    assert CsvImageDataLoader(small_data, batch_size=4, num_workers=limit).num_workers == limit  # not started yet
    with pytest.raises(UserError, match=f"data_loader.args.num_workers: {limit + 1} worker processes for the "
                                        f"{available_cpus()} CPUs this process may use; at most {limit}"):
        CsvImageDataLoader(small_data, batch_size=4, num_workers=limit + 1)


def test_trying_the_transforms_leaves_the_random_generators_as_they_were(small_data):
    """The loader puts one image through its transforms when it is built; the model built next is initialised alike."""
    import random

    import numpy as np

    draws = []
    for transforms in ([], [{"type": "RandomRotation", "args": {"degrees": 30}}]):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        CsvImageDataLoader(small_data, batch_size=4, train_transforms=transforms, eval_transforms=transforms)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]


def test_a_group_split_with_too_few_groups_names_validation_split(small_data):
    rows = read_csv_rows(small_data / "train.csv")
    with_csv(small_data, [(r["id"], r["label"], n % 3) for n, r in enumerate(rows)], header="id,label,site")
    with pytest.raises(UserError, match=r"^data_loader.args.validation_split: 0.1 with a group_column is one fold of "
                                        r"10: 3 groups cannot fill 10 folds"):
        CsvImageDataLoader(small_data, batch_size=4, group_column="site", validation_split=0.1)


def test_an_empty_dataset_is_one_line():
    with pytest.raises(UserError, match=r"^data_loader: the dataset \(list\) has no samples"):
        BaseDataLoader([], batch_size=4, shuffle=False, validation_split=0, num_workers=0)


@pytest.mark.parametrize("values", [[0.5, 0.5, 0.5], [0.5, 0.5]])
def test_mean_and_std_for_another_channel_count_are_one_line(values):
    transform = image_transform([], values, values, "eval_transforms")
    with pytest.raises(UserError, match=f"data_loader.args.mean and data_loader.args.std: {len(values)} and "
                                        f"{len(values)} values for 1-channel images"):
        transform(torch.zeros(1, 4, 4, dtype=torch.uint8))
    one_for_all = image_transform([], [0.5], [0.25], "eval_transforms")(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    assert torch.equal(one_for_all, torch.full((3, 2, 2), 2.0))


@pytest.mark.parametrize("batch_size, sizes", [(19, [19]), (4, [4] * 5), (6, [6, 6, 6, 2])])
def test_a_training_epoch_never_ends_in_a_batch_of_one_sample(small_data, batch_size, sizes):
    """Batch norm cannot train on one sample: with 20 images and batches of 19, the epoch is one batch."""
    loader = CsvImageDataLoader(small_data, batch_size=batch_size, validation_split=0.0)
    assert [len(inputs) for inputs, _ in loader] == sizes
    assert len(loader) == len(sizes)


@pytest.mark.parametrize("how", ["data", "data and its digest"])
def test_a_tampered_cache_is_decoded_again_with_a_warning(small_data, tmp_path, warnings_seen, how):
    """Every byte of the kept pixels inverted (same size, index untouched), or the index's digest rewritten to match:
    the cache is compared with the images it stands for and decoded again, never used."""
    import hashlib

    cache = tmp_path / "cache"
    dataset(small_data, cache)
    reference = images_of(dataset(small_data, None))
    (index,) = cache.glob("*.pt")
    saved = torch.load(index, weights_only=True)
    data = cache / saved["data"]
    data.write_bytes(bytes(255 - b for b in data.read_bytes()))
    if how == "data and its digest":
        torch.save({**saved, "digest": hashlib.sha256(data.read_bytes()).hexdigest()}, index)
    rebuilt = images_of(dataset(small_data, cache))
    assert all(torch.equal(a, b) for a, b in zip(reference, rebuilt, strict=True))
    (message,) = warnings_seen.messages
    assert "decoding again" in message and ("digest" in message if how == "data" else "pixels of" in message)


@pytest.mark.parametrize("target", ["fifo", "/dev/zero", "folder"])
@pytest.mark.parametrize("which", ["image", "csv"])
def test_an_image_or_csv_that_is_no_regular_file_is_one_line(small_data, target, which):
    """A symbolic link to a FIFO neither hangs nor reads; one to /dev/zero does not read without end."""
    first = read_csv_rows(small_data / "train.csv")[0]["id"]
    path = small_data / "train" / f"{first}.png" if which == "image" else small_data / "train.csv"
    if which == "csv":
        path.rename(small_data / "labels.csv")
    else:
        path.unlink()
    if target == "fifo":
        os.mkfifo(small_data / "fifo")
    elif target == "folder":
        (small_data / "folder").mkdir()
    path.symlink_to(target if target.startswith("/") else small_data / target)
    with pytest.raises(UserError, match="not a regular file"):
        CsvImageDataLoader(small_data, batch_size=4, validation_split=0, classes=list(range(10)))


def test_an_image_of_too_many_pixels_is_refused_from_its_header_undecoded(small_data):
    """A PNG whose header says 50000x50000 (2.5 billion pixels) is one line, read no further than its header; the
    bound is the user's to raise."""
    import struct
    import zlib

    first = read_csv_rows(small_data / "train.csv")[0]["id"]
    path = small_data / "train" / f"{first}.png"
    data = path.read_bytes()
    header = data[12:16] + struct.pack(">II", 50000, 50000) + data[24:29]
    path.write_bytes(data[:8] + data[8:12] + header + struct.pack(">I", zlib.crc32(header)) + data[33:])
    with pytest.raises(UserError, match=r"50000x50000 pixels, more than the 100,000,000 allowed "
                                        r"\(data_loader.args.max_image_pixels raises the bound\)"):
        CsvImageDataLoader(small_data, batch_size=4, validation_split=0, classes=list(range(10)))
    shutil.copy2(DATA / "train" / f"{first}.png", path)
    with pytest.raises(UserError, match="28x28 pixels, more than the 783 allowed"):
        CsvImageDataLoader(small_data, batch_size=4, validation_split=0, classes=list(range(10)), max_image_pixels=783)
    assert len(CsvImageDataLoader(small_data, batch_size=4, validation_split=0, max_image_pixels=784).dataset) == 20


def test_a_sample_submission_that_is_no_regular_file_is_one_line():
    from trainer.inference import read_sample

    with pytest.raises(UserError, match=r"inference.sample_submission: cannot read '/dev/zero' \(.*not a regular file"):
        read_sample("/dev/zero")


def test_a_blend_input_that_is_no_regular_file_is_one_line(tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo.csv")
    assert evaluate(["--blend", tmp_path / "fifo.csv", "/dev/zero", "--out", tmp_path / "out"]) == 2
    assert "not a regular file" in error_line(capsys) and not (tmp_path / "out").exists()


def test_a_csv_of_many_columns_is_named_in_a_short_line(small_data):
    wide = ",".join(f"c{i}" for i in range(40_000))
    (small_data / "train.csv").write_text(f"{wide}\n" + ",".join("0" * 40_000) + "\n")
    with pytest.raises(UserError) as refused:
        CsvImageDataLoader(small_data, batch_size=4, validation_split=0)
    assert "c0, c1, c2" in str(refused.value) and "(40,000 in all)" in str(refused.value)
    assert len(str(refused.value)) < 400
