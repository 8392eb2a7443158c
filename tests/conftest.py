import hashlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("SASREC_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def shared_file(name):
    """Path of a real dataset in ../shared/data; skipped only in a user's clone without it, never in CI."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must have ../shared/data beside the repository")
        pytest.skip(f"{path} not found (real datasets live in ../shared/data; set SASREC_SHARED_DATA to point "
                    f"elsewhere)")
    return path


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


class Replay:
    """Stands in for TrainBatches: an epoch of the given batches, in order; `mean_rows` for --loss_reduction
    position (TrainBatches' mean trained positions per batch)."""

    def __init__(self, steps, mean_rows=None):
        self.steps, self.mean_rows = steps, mean_rows

    def __len__(self):
        return len(self.steps)

    def epoch(self, rng):
        return iter(self.steps)


TINY = ["--data", "synthetic", "--device", "cpu", "--maxlen", "10", "--hidden_units", "16", "--num_blocks", "1",
        "--batch_size", "256", "--cache_dir", ""]  # 4,000 users: 16 batches per epoch


def snapshot(folder):
    """{relative path: sha256} of every file below `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def fails_with(capsys, entry, argv, message, code=2):
    """Run a command's main(argv): it must exit `code` with one line on stderr holding `message`."""
    with pytest.raises(SystemExit) as e:
        entry(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1  # one line, no traceback
    return err
