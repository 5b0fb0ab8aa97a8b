"""Check the built site's API reference: every public name is in it, with a docstring.

Run after ``mkdocs build --strict`` (CI does): ``python docs/check_reference.py [SITE_DIR]``. Static (griffe, as
mkdocstrings reads the package), so it needs no Paddle. Fails (exit 1, one line per problem) when

* a name of ``paddle_pinn_balance.__all__`` has no docstring, or its object is missing from the site's
  inventory (``site/objects.inv``, written by mkdocstrings for every object it rendered);
* a public function, class or method of those modules that the reference renders has no docstring;
* a module of the package has no page under ``docs/api/`` (``::: paddle_pinn_balance.MODULE``).
"""

from __future__ import annotations

import os
import sys
import zlib

import griffe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "paddle_pinn_balance"
NOT_DOCUMENTED = {"__main__", "_version"}  # python -m entry point; the version string's holder


def inventory(site: str) -> set:
    with open(os.path.join(site, "objects.inv"), "rb") as f:
        for _ in range(4):
            f.readline()
        lines = zlib.decompress(f.read()).decode().splitlines()
    return {line.split(" ", 1)[0] for line in lines}


def _public(obj) -> bool:
    return not obj.name.startswith("_")


def main(site: str = os.path.join(ROOT, "site")) -> int:
    extensions = griffe.load_extensions(os.path.join(ROOT, "docs", "griffe_rst.py") + ":RstToMarkdown")
    pkg = griffe.load(PACKAGE, search_paths=[ROOT], docstring_parser="google", extensions=extensions)  # as the site
    rendered, problems = inventory(site), []
    exports = [e if isinstance(e, str) else e.name for e in pkg.exports or ()]
    if not exports:
        problems.append(f"{PACKAGE}.__all__ is empty or unreadable")
    for name in exports:
        obj = pkg[name]
        target = obj.final_target if obj.is_alias else obj
        if not (target.docstring and target.docstring.value.strip()):
            problems.append(f"{PACKAGE}.{name} ({target.path}) has no docstring")
        if target.path not in rendered:
            problems.append(f"{PACKAGE}.{name} ({target.path}) is not in the API reference")
        if target.is_class:  # its public methods, as the reference shows them
            for member in target.members.values():
                if member.is_function and _public(member) and not member.docstring and member.path in rendered:
                    problems.append(f"{member.path} is rendered without a docstring")
    pages = "".join(open(os.path.join(ROOT, "docs", "api", f), encoding="utf-8").read()
                    for f in os.listdir(os.path.join(ROOT, "docs", "api")) if f.endswith(".md"))
    for module in pkg.modules.values():
        if module.name not in NOT_DOCUMENTED and f"::: {module.path}\n" not in pages:
            problems.append(f"module {module.path} has no page under docs/api/")
    for p in problems:
        print("check_reference:", p, file=sys.stderr)
    print(f"check_reference: {len(exports)} public names, {len(rendered)} rendered objects, "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
