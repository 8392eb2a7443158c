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
