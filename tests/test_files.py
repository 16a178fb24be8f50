"""Files written whole or not at all: ``keras_psm.files.write_atomically``."""

import os

import pytest

from keras_psm.files import temporary_name, write_atomically


def test_the_file_appears_only_when_the_block_succeeds(tmp_path):
    path = tmp_path / "model.keras"
    with write_atomically(path) as temporary:
        assert os.path.dirname(temporary) == str(tmp_path)  # same folder: os.replace is atomic
        assert temporary.endswith(".keras") and temporary != str(path)
        with open(temporary, "wb") as handle:
            handle.write(b"new")
        assert not path.exists()
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.keras"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_write_keeps_the_old_file_and_leaves_nothing(tmp_path, error):
    path = tmp_path / "results.csv"
    path.write_bytes(b"old contents")
    with pytest.raises(type(error)):
        with write_atomically(path) as temporary:
            with open(temporary, "wb") as handle:
                handle.write(b"half a fi")
            raise error
    assert path.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["results.csv"]


def test_a_writer_that_fails_before_creating_the_file(tmp_path):
    path = tmp_path / "plot.png"
    with pytest.raises(ValueError, match="bad figure"):
        with write_atomically(path):
            raise ValueError("bad figure")
    assert os.listdir(tmp_path) == []


def test_a_link_is_kept_and_its_target_replaced(tmp_path):
    target = tmp_path / "real" / "model.tflite"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.tflite"
    link.symlink_to(target)
    with write_atomically(link) as temporary:
        assert os.path.dirname(temporary) == str(target.parent)
        with open(temporary, "wb") as handle:
            handle.write(b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(os.listdir(target.parent)) == ["model.tflite"]


def test_temporary_names_are_hidden_fresh_and_keep_the_suffix():
    first, second = temporary_name("/out/best.tflite"), temporary_name("/out/best.tflite")
    assert first != second
    for name in (first, second):
        assert os.path.dirname(name) == "/out"
        assert os.path.basename(name).startswith(".best-") and name.endswith(".tmp.tflite")
