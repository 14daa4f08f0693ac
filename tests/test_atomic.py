"""Run-folder files are replaced whole or appended line by line; a torn last line is dropped."""

import json

import pytest

from selfcleanse_jax import atomic


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = atomic.write_text(tmp_path / "config.json", "old\n")
    with pytest.raises(RuntimeError), atomic.replacing(path) as f:
        f.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    atomic.write_text(path, "new\n")
    assert path.read_text() == "new\n"


def test_a_torn_last_line_is_dropped_and_said(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for epoch in range(2):
        atomic.append_line(path, json.dumps({"epoch": epoch}))
    assert atomic.read_jsonl(path) == ([{"epoch": 0}, {"epoch": 1}], None)
    with path.open("a") as f:
        f.write('{"epoch": 2, "train_lo')
    lines, torn = atomic.read_jsonl(path)
    assert lines == [{"epoch": 0}, {"epoch": 1}]
    assert "torn last line" in torn and str(path) in torn


def test_a_broken_line_before_the_last_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2: not JSON"):
        atomic.read_jsonl(path)


def test_a_write_error_names_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    full = pytest.raises(OSError, match=r"No space left on device: '.*metrics.jsonl'")
    with full, atomic.replacing(path):
        raise OSError(28, "No space left on device")
    assert not list(tmp_path.iterdir())
