"""A misspelt setting name is refused at start-up with "did you mean"; an application's own names are not."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lamsonfilter.cli import main
from lamsonfilter.settings import SettingsError, load_settings


def app_with(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config").mkdir(parents=True)
    (tmp_path / "config" / "settings.py").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('HANDLERS = ["x"]\nHANDLRES = ["y"]\n', "unknown setting HANDLRES; did you mean HANDLERS?"),
        ('HANDLERS = ["x"]\nREPLY_LIMITS = (5, 3600)\n', "unknown setting REPLY_LIMITS; did you mean REPLY_LIMIT?"),
        ('HANDLERS = ["x"]\nDATABSE_URL = "sqlite:///x.db"\n', "did you mean DATABASE_URL?"),
        ('HANDLERS = ["x"]\nHosts = ["a.example"]\n', "Hosts is not a setting (settings are in capitals); "
                                                     "did you mean HOSTS?"),
    ],
)
def test_a_misspelt_setting_is_refused_with_a_suggestion(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_settings(app_with(tmp_path, text))


def test_the_start_up_error_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    app = app_with(tmp_path, 'HANDLERS = ["x"]\nHANDLRES = ["y"]\n')
    r = CliRunner().invoke(main, ["routes", "--app", str(app)])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "did you mean HANDLERS?" in r.output


def test_an_applications_own_settings_are_kept(tmp_path: Path) -> None:
    text = ('HANDLERS = ["x"]\nLISTS = {"python": "Python"}\nCONFIRM_TTL = 60\nBOUNCE_LIMIT = 3\n'
            'import re\nhosts = ["a.example"]\nHOST = "a.example"\nOWN_SETTINGS = ["HOST"]\n')
    values = load_settings(app_with(tmp_path, text))
    assert values["LISTS"] == {"python": "Python"} and values["HOST"] == "a.example"
    with pytest.raises(SettingsError, match="did you mean HOSTS"):
        load_settings(app_with(tmp_path / "b", text.replace('OWN_SETTINGS = ["HOST"]\n', "")))
