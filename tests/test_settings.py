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
