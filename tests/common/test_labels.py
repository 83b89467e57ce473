"""common.labels: the one labels.txt reader, UTF-8 whatever the machine's locale."""
import pytest

from common.labels import read_labels


def test_utf8_labels_with_a_byte_order_mark_read_as_written(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes("\ufeffcafé\nnaïve 猫\n\n".encode("utf-8"))  # as Windows editors save it
    assert read_labels(path) == ["café", "naïve 猫"]


def test_a_file_in_another_encoding_is_named_not_misread(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("cat\ncafé\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path}: not UTF-8 text .* save it as UTF-8"):
        read_labels(path)
