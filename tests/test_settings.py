from pathlib import Path

import pytest

from mmsearch.errors import UsageError
from mmsearch.settings import resolve


def test_flag_beats_environment_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MMSEARCH_HOME", str(tmp_path / "from-env"))
    monkeypatch.setenv("MMSEARCH_MODEL", "RN50:openai")
    assert resolve().home == (tmp_path / "from-env").resolve()
    assert resolve().model == "RN50:openai"
    assert resolve(home=tmp_path / "flag", model="x:y").home == (tmp_path / "flag").resolve()
    assert resolve(model="x:y").model == "x:y"


def test_default_home_is_per_user_data_dir(tmp_path: Path):
    # conftest points XDG_DATA_HOME at tmp_path / "xdg-data"
    assert resolve().home == (tmp_path / "xdg-data" / "mmsearch").resolve()
    assert resolve().model is None


def test_bad_numbers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MMSEARCH_BATCH_SIZE", "lots")
    with pytest.raises(UsageError, match="MMSEARCH_BATCH_SIZE"):
        resolve()
    with pytest.raises(UsageError):
        resolve(batch_size=0)


def test_max_file_size_takes_sizes_from_flag_then_environment(monkeypatch: pytest.MonkeyPatch):
    from mmsearch.files import DEFAULT_MAX_FILE_SIZE
    from mmsearch.settings import parse_size

    assert resolve().max_file_size == DEFAULT_MAX_FILE_SIZE == parse_size("200MB")
    assert [parse_size(s) for s in ("1G", "1.5GiB", "500k", "2 mb", "123")] == [
        10**9, 3 * 2**29, 500_000, 2_000_000, 123
    ]
    monkeypatch.setenv("MMSEARCH_MAX_FILE_SIZE", "1G")
    assert resolve().max_file_size == 10**9
    assert resolve(max_file_size="20MB").max_file_size == 20_000_000
    monkeypatch.setenv("MMSEARCH_MAX_FILE_SIZE", "lots")
    with pytest.raises(UsageError, match="MMSEARCH_MAX_FILE_SIZE 'lots' is not a size"):
        resolve()
    with pytest.raises(UsageError, match="at least 1 byte"):
        parse_size("0")


def test_text_precision_from_flag_then_environment(monkeypatch: pytest.MonkeyPatch):
    assert resolve().text_precision == "auto"
    monkeypatch.setenv("MMSEARCH_TEXT_PRECISION", "Float32")
    assert resolve().text_precision == "float32"
    assert resolve(text_precision="bfloat16").text_precision == "bfloat16"
    with pytest.raises(UsageError, match="--text-precision 'half' is not one of auto, float32, bfloat16"):
        resolve(text_precision="half")
    monkeypatch.setenv("MMSEARCH_TEXT_PRECISION", "fp8")
    with pytest.raises(UsageError, match="MMSEARCH_TEXT_PRECISION 'fp8'"):
        resolve()
