"""Files read as data are opened only when they are regular files: a FIFO would block for ever and a device such as
/dev/zero would read without end, so a CSV, an image or a JSON file (a run group's manifest, a task.json) that is
either (or a symbolic link to one) is refused."""
import os
import stat

KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path, mode="rb", **kwargs):
    """`open(path, mode, **kwargs)` for reading a regular file (symbolic links followed); an OSError saying what
    else it is, without waiting for a FIFO's writer."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in KINDS if test(info.st_mode)), "no regular file")
            raise OSError(0, f"{kind}, not a regular file", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise
