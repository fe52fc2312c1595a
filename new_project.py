"""Start a new project from this template.

    python new_project.py ../my-competition [--with-sample-data]

Copies the code, configs, tests and CI script. Leaves out runs (saved/), caches, virtual environments and
version-control data; the template's own benchmarks (benchmarks/) and the provenance of its sample data
(data/make_mnist5k.py, data/README.md); and the sample images (data/mnist5k) unless --with-sample-data is given
(without them the tests generate a small stand-in dataset of their own).
"""
import argparse
import shutil
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent
SKIPPED = {".git", "saved", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv", "venv", ".mypy_cache",
           ".ipynb_checkpoints"}
SAMPLE_DATA = TEMPLATE / "data" / "mnist5k"
TEMPLATE_ONLY = {TEMPLATE / "benchmarks", SAMPLE_DATA.parent / "make_mnist5k.py", SAMPLE_DATA.parent / "README.md"}


def copy_template(target, with_sample_data=False):
    """Copy the template into `target`, which must not exist or be empty."""
    target = Path(target).resolve()
    if target.exists() and any(target.iterdir()):
        raise SystemExit(f"error: {target} exists and is not empty; choose a new folder")
    if target == TEMPLATE or TEMPLATE in target.parents:
        raise SystemExit(f"error: {target} is inside the template; choose a folder outside it")

    def ignore(folder, names):
        skipped = {n for n in names if n in SKIPPED or n.endswith((".pyc", ".pth", ".tmp"))
                   or Path(folder).resolve() / n in TEMPLATE_ONLY}
        if Path(folder).resolve() == SAMPLE_DATA.parent and not with_sample_data:
            skipped.add(SAMPLE_DATA.name)
        return skipped

    shutil.copytree(TEMPLATE, target, ignore=ignore, dirs_exist_ok=True)
    (target / "saved").mkdir(exist_ok=True)
    (target / "saved" / ".gitkeep").touch()
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description="Start a new project from this template.")
    parser.add_argument("target", help="folder for the new project (new or empty)")
    parser.add_argument("--with-sample-data", action="store_true", help="also copy data/mnist5k (1.6 MB of images)")
    args = parser.parse_args(argv)
    target = copy_template(args.target, args.with_sample_data)
    print(f"new project in {target}\nnext: cd {target} && git init && python -m pytest -q tests")
    print("data: config.json expects the competition data in data/mnist5k (train.csv with id,label; images in "
          "train/ and test/), or make the project with --with-sample-data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
