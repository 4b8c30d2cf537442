from pathlib import Path

from nolaserve.v1 import _generate


def test_generated_stubs_are_up_to_date():
    """Regenerate with: python -m nolaserve.v1._generate"""
    stale = [name for name, text in _generate.generate().items()
             if (Path(_generate.HERE) / name).read_text() != text]
    assert not stale, f"stale stubs {stale}: run python -m nolaserve.v1._generate"
