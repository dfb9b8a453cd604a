"""The documentation names every setting, so the configuration reference stays true."""

from __future__ import annotations

from pathlib import Path

from services.shared import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_setting_is_documented() -> None:
    """Each HOOKWIRE_* variable appears in docs/configuration.md, and nothing extra does."""
    text = (DOCS / "configuration.md").read_text()
    expected = {f"HOOKWIRE_{name.upper()}" for name in Settings.model_fields}
    for variable in expected:
        assert f"`{variable}`" in text, variable
    documented = {
        word.strip("`")
        for word in text.split()
        if word.startswith("`HOOKWIRE_") and "*" not in word
    }
    assert documented - expected == set()
