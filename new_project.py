"""Start a new project from this template.

    python new_project.py ../my-competition [--with-sample-data]

Copies the files the template's git tracks (code, configs, tests, docs, CI script), so runs, caches, virtual
environments and stray outputs never travel, wherever they were written. Leaves out the template's own benchmarks
(benchmarks/), the provenance of its sample data (data/make_mnist5k.py, data/README.md) and the sample images
(data/mnist5k) unless --with-sample-data is given (without them the tests generate a small stand-in dataset). The
copy gets a README of its own; the template's README goes to docs/template.md.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent
TEMPLATE_ONLY = ("benchmarks/", "data/make_mnist5k.py")
SAMPLE_DATA = ("data/mnist5k/", "data/README.md")  # the images, with their source and licence


def tracked_files(template):
    """The paths (relative, as POSIX strings) that git tracks in `template`, as they are on disk now; in a repository
    where nothing is added yet (a copy just given `git init`), every file it does not ignore."""
    def ls_files(*which):
        return subprocess.run(["git", "-C", str(template), "ls-files", "-z", *which], capture_output=True,
                              check=True).stdout.decode()

    try:
        listed = ls_files("--cached") or ls_files("--others", "--exclude-standard")
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"error: {template} is not a git checkout (git ls-files failed); clone the template with "
                         f"git, then run new_project.py from the clone") from None
    return [name for name in listed.split("\0") if name and (template / name).is_file()]


def copy_template(target, with_sample_data=False, template=TEMPLATE):
    """Copy the tracked files of `template` into `target`, which must not exist or be empty."""
    target = Path(target).resolve()
    if target.exists() and any(target.iterdir()):
        raise SystemExit(f"error: {target} exists and is not empty; choose a new folder")
    if target == template or template in target.parents:
        raise SystemExit(f"error: {target} is inside the template; choose a folder outside it")
    left_out = TEMPLATE_ONLY + (() if with_sample_data else SAMPLE_DATA)
    for name in tracked_files(template):
        if name.startswith(left_out):
            continue
        destination = target / ("docs/template.md" if name == "README.md" else name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(template / name, destination)
    if (target / "docs" / "template.md").exists():
        template_readme = target / "docs" / "template.md"
        links = re.sub(r"\]\((?!docs/|[a-z]+:|#)", "](../", template_readme.read_text())  # now one folder down
        template_readme.write_text(links.replace("](docs/", "]("))
    (target / "saved").mkdir(parents=True, exist_ok=True)
    (target / "saved" / ".gitkeep").touch()
    (target / "README.md").write_text(project_readme(target))
    return target


def project_readme(target):
    """A README that speaks of the new project: where its data goes, how it trains, tests and is tested."""
    try:
        config = json.loads((target / "config.json").read_text())
        name, data_dir = config["name"], config["data_loader"]["args"]["data_dir"]
        test_csv = config["data_loader"]["args"].get("test_csv", "test.csv")
    except (OSError, ValueError, KeyError, TypeError):
        name, data_dir, test_csv = "my_run", "data/", "test.csv"
    return f"""# {target.name}

Trained with `train.py` from one JSON config (`config.json`); evaluated and turned into a submission with
`test.py`.

## Data

`config.json` reads the data from `{data_dir}`: `train.csv` (an `id` column and the label column) with the
images in `train/`, and `{test_csv}` (the test ids) with the images in `test/`. Change `data_loader.args` (`data_dir`,
`label_column`, `extension`, ...) to match the competition's files; docs/configuration.md lists every argument.

## Train and predict

```bash
python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt
python train.py -c config.json
python test.py -r saved/{name}/<run id>/model_best.pth
```

`python train.py -c config.json --folds all` trains every fold of `data_loader.args.n_folds`; `python test.py -r
saved/{name}/<group>` predicts with their ensemble. Resume a stopped run with `python train.py -r <run folder>`.

## Tests

```bash
python -m pytest -q tests                   # everything
python -m pytest -q -m "not slow" tests     # the fast subset, while editing
```

## Reference

docs/template.md is the template's own guide (adding models, losses and metrics, hooks, the competition
workflow); docs/ holds the full reference.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description="Start a new project from this template.")
    parser.add_argument("target", help="folder for the new project (new or empty)")
    parser.add_argument("--with-sample-data", action="store_true", help="also copy data/mnist5k (1.6 MB of images)")
    args = parser.parse_args(argv)
    target = copy_template(args.target, args.with_sample_data)
    print(f"new project in {target}\nnext: cd {target} && git init && python -m pytest -q tests")
    print("data: config.json expects the competition data in data/mnist5k (train.csv with id,label; images in "
          "train/ and test/), or make the project with --with-sample-data; README.md says the rest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
