"""atomic_file: the final path holds either the old content or the whole new one, never a part."""
import numpy as np
import pytest

from atomic_file import atomic_path, write_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out" / "leaderboard.csv"
    write_atomically(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("crash midway")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["leaderboard.csv"]


def test_the_temp_path_keeps_the_suffix_so_numpy_does_not_rename_it(tmp_path):
    path = tmp_path / "val-probs.npy"
    with atomic_path(path) as tmp:
        np.save(tmp, np.arange(3, dtype=np.uint8))
    assert np.load(path).tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["val-probs.npy"]
