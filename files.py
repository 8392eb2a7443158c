"""Files written so that a crash or kill -9 at any moment leaves the old version or the new one, never half."""
import json
import os
import re
import shutil


def atomic_write(path, write):
    """write(tmp_path), flush it to disk, then rename onto `path`.

    A crash or kill -9 at any moment leaves either the old file or the new one, never half of one.
    """
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temp_files(folder):
    """Temp files and folders left by a killed process ('.<name>.tmp<pid>[-suffix]' whose pid is gone)."""
    for name in os.listdir(folder):
        found = re.fullmatch(r"\..+\.tmp(\d+)(-\w+)?", name)
        if found and not _pid_alive(int(found[1])):
            path = os.path.join(folder, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists (PermissionError: it does)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


class FolderBusy(Exception):
    """Another live process holds the folder's lock; args[0] is its pid as it wrote it ('' if unknown)."""


LOCK_FILE = ".lock"
_held_locks = {}  # folder -> open descriptor: the lock lasts as long as the descriptor


def lock_folder(folder):
    """Hold an exclusive advisory lock (flock) on `folder`/.lock until release_locks() or this process's
    end: the kernel drops it however the process dies (kill -9 included), so a stale lock never blocks.
    Raises FolderBusy(pid) at once when another process holds it, PermissionError if it cannot be created."""
    import fcntl  # POSIX; imported here so that the rest of this module works everywhere
    folder = os.path.abspath(folder)
    if folder in _held_locks:
        return
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise FolderBusy(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[folder] = fd


def release_locks():
    """Drop every lock this process holds (a run's end; in-process callers such as tests start over)."""
    while _held_locks:
        os.close(_held_locks.popitem()[1])
