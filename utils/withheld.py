"""What files a checkpoint alone names may not show. A checkpoint may name a data folder outside its run folder and
the working folder (where its run trained); the files there are read as data, but no line the program prints quotes
them: a checkpoint from elsewhere naming `/etc` and `passwd` would otherwise read the file back in an error. A line
that names such a folder keeps only what comes before its first quoted, bracketed or parenthesised part (a
checkpoint's own quoted name excepted)."""
import os
import re
from pathlib import Path

FOLDERS = {}  # each spelling of a withheld folder -> the checkpoint that alone names it
SOURCES = set()  # every checkpoint that names one: their own quoted names are no file's contents
QUOTED = re.compile(r"['\"(\[{`]")


def withhold(folder, source):
    """Quote no file of `folder`, which only the checkpoint (or run group) `source` names, in any printed line."""
    SOURCES.add(source)
    for spelling in {str(Path(folder)), os.path.abspath(folder), os.path.realpath(folder)}:
        FOLDERS[spelling] = FOLDERS[" ".join(spelling.split())] = source  # as printed lines space it


def forget():
    """Start a command with no folder withheld."""
    FOLDERS.clear()
    SOURCES.clear()


def shown(text):
    """`text` as it may be printed: whole, unless it names a withheld folder; then cut before its first quoted,
    bracketed or parenthesised part other than a checkpoint's own quoted name."""
    named = next((folder for folder in FOLDERS if folder in text), None)
    masked = text
    for source in SOURCES:
        masked = masked.replace(repr(source), " " * len(repr(source)))
    cut = QUOTED.search(masked) if named else None
    if cut is None:
        return text
    return (f"{text[:cut.start()].rstrip(' :,;')} (the rest is not shown: it may quote files of {named!r}, which only "
            f"{FOLDERS[named]!r} names, outside its run folder and the working folder; give that folder with "
            f"-o data_loader.args.data_dir=... to see it)")
