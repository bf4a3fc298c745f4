"""Docs generated from code stay true to it."""

from tools import configdoc


def test_config_reference_is_fresh():
    assert configdoc.DOC.read_text() == configdoc.render(), "run `python -m tools.configdoc`"


def test_every_setting_has_help_text():
    for line in configdoc.render().splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"a setting without help text: {line}"
