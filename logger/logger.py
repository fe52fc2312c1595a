"""Console and file logging for a run: plain messages on the console, timestamped lines in `<run>/train.log`."""
import logging
import sys

LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def setup_logging(verbosity=2):
    """Send the project's log messages to the console at the config's `verbosity` (0 warnings, 1 info, 2 debug)."""
    logger = logging.getLogger("template")
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(LEVELS.get(verbosity, logging.DEBUG))
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    return logger


def add_log_file(logger, path):
    """Also log to `path`, replacing the file of an earlier run in this process (one per fold)."""
    for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
