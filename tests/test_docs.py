"""The documentation site: its ``pycon`` examples run with the output shown, and its reference covers the API.

The API reference's examples are the docstrings' (``tests/test_doctests.py`` runs them); the site's own pages
(``docs/**/*.md``) show ``pycon`` blocks that run here, each page in one namespace, blocks in order. The
strict build itself (broken links, missing references) and the rendered reference
(``docs/check_reference.py``) are checked in CI, with the ``[docs]`` extra.
"""

import doctest
import glob
import os
import re

import pytest

import paddle_pinn_balance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))
_BLOCK = re.compile(r"^```pycon\n(.*?)^```", re.S | re.M)


def _examples(path):
    with open(path, encoding="utf-8") as f:
        return _BLOCK.findall(f.read())


@pytest.mark.parametrize("path", [p for p in PAGES if _examples(p)], ids=lambda p: os.path.relpath(p, DOCS))
def test_page_examples_run_with_the_output_shown(path):
    text = "\n".join(_examples(path))
    if "ppsci" in text:
        pytest.importorskip("ppsci")
    test = doctest.DocTestParser().get_doctest(text, {}, os.path.relpath(path, ROOT), path, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} example(s) of {path} failed (see above)"


def test_the_pages_show_examples():
    assert len([p for p in PAGES if _examples(p)]) >= 2  # getting started and how to add a method at least


def test_every_public_name_has_a_docstring_and_every_module_a_reference_page():
    """The part of docs/check_reference.py that needs no build (that script also reads the built site)."""
    for name in paddle_pinn_balance.__all__:
        assert (getattr(paddle_pinn_balance, name).__doc__ or "").strip(), f"{name} has no docstring"
    pages = "".join(open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(DOCS, "api", "*.md")))
    package = os.path.dirname(paddle_pinn_balance.__file__)
    modules = [os.path.splitext(f)[0] for f in os.listdir(package) if f.endswith(".py") and f[0] != "_"]
    modules += [d for d in os.listdir(package) if os.path.isfile(os.path.join(package, d, "__init__.py"))]
    for module in modules:
        assert f"::: paddle_pinn_balance.{module}\n" in pages, f"docs/api/ has no page for {module}"


def test_the_version_has_one_source():
    with open(os.path.join(ROOT, "paddle_pinn_balance", "_version.py"), encoding="utf-8") as f:
        assert f'__version__ = "{paddle_pinn_balance.__version__}"' in f.read()
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        setup = f.read()
    assert "_version.py" in setup and "version=VERSION" in setup and not re.search(r"version=['\"]", setup)
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        assert f"## [{paddle_pinn_balance.__version__}]" in f.read()
