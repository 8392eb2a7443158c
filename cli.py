"""Errors as exceptions, turned into one line on stderr and an exit status in one place (`exits`)."""
import argparse
import functools
import os
import sys
from typing import Optional

import torch


class UsageError(Exception):
    """Bad input: a flag, config key, data file or checkpoint. Exit status 2 (argparse's convention)."""
    code = 2


class RunError(Exception):
    """A run that started and failed (e.g. a non-finite loss). Exit status 1."""
    code = 1


def first_line(error):
    """The first line of an exception's message (torch's can run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def exits(entry):
    """Decorate a command's main(): UsageError / RunError become `error: <message>` and their exit status;
    Ctrl-C outside the training loop (which saves and exits itself) prints no traceback."""
    @functools.wraps(entry)
    def wrapper(*args, **kwargs):
        try:
            return entry(*args, **kwargs)
        except (UsageError, RunError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError (one line) instead of the whole usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def make_writable_folder(folder, flag):
    """Create `folder` and prove a file can be written there, or raise naming `flag`."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: not a writable folder ({e.strerror})") from None


def resolve_device(name):
    """--device: auto (CUDA when present), cpu, cuda, cuda:1, ...; CUDA asked for where there is none is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


BF16_MATRIX_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 instructions that multiply bf16 matrices natively


@functools.lru_cache(maxsize=None)
def cpu_bf16_instructions() -> tuple:
    """Which of BF16_MATRIX_FLAGS this CPU has, from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(flag for flag in BF16_MATRIX_FLAGS if flag in flags)


def amp_dtype(device: torch.device, amp: str) -> Optional[torch.dtype]:
    """--amp: the dtype of the encoder's and the softmax pool's matmuls, None for fp32. On a CPU, bf16 only
    where it has native bf16 matrix instructions: emulated bf16 is slower than fp32."""
    if amp != "bf16" or (device.type == "cpu" and not cpu_bf16_instructions()):
        return None
    return torch.bfloat16
