"""Command-line plumbing shared by main.py and eval/infer.py: every error is one line and exit status 2."""
import argparse
import os
import sys


def fail(message, code=2):
    """One line on stderr and a non-zero exit: 2 for bad input (argparse's convention), 1 for a failed run."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def first_line(error):
    """The first line of an exception's message (torch's can run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def run(entry):
    """Run a command's main(); Ctrl-C outside the training loop (which saves and exits itself) prints no traceback."""
    try:
        entry()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`) instead of the whole usage block."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")


def make_writable_folder(folder, flag):
    """Create `folder` and prove a file can be written there, or fail naming `flag`."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"{flag} {folder}: not a writable folder ({e.strerror})")
