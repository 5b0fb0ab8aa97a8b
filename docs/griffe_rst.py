"""A griffe extension for the documentation site: the docstrings' reStructuredText markup as Markdown.

The package's docstrings are Google style with reST inline markup (``:math:``, ``.. math::``, ``:class:`` and
the other cross-reference roles, double-backquoted literals), the form ``help()`` and a reader of the source
expect. mkdocstrings renders Markdown, so this extension rewrites the markup once the whole package is loaded:

* ``:math:`x``` -> ``$x$`` and ``.. math:: x`` (with its indented continuation) -> a ``$$`` block
  (pymdownx.arithmatex renders both with MathJax);
* ``:class:`~paddle_pinn_balance.X``` (also ``func``, ``meth``, ``mod``, ``data``, ``attr``) -> an autorefs
  link ``[X][paddle_pinn_balance.ntk.X]`` when the target is a documented public object of the package (the
  strict build then fails if the reference does not render it); a private or undocumented target, or one
  outside the package (``paddle.nn.Layer``), becomes a literal. A target of the package that does not exist
  at all raises: the build fails naming the docstring and the target;
* double-backquoted literals -> single backquotes.

Examples (``>>>`` lines, with their output) are left exactly as they are: the site shows what the doctests run.
"""

from __future__ import annotations

import ast
import inspect
import re

import griffe

PACKAGE = "paddle_pinn_balance"
_ROLE = re.compile(r":(class|func|meth|mod|data|attr|obj|exc):`(~?)([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.S)  # a literal may break across lines
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def _math_blocks(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = _BLOCK.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, body = m["indent"], [m["first"].strip()] if m["first"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            if lines[i].strip() == "" and body and (i + 1 >= len(lines) or not lines[i + 1].startswith(indent + " ")):
                break  # a blank line followed by text at the block's own indentation ends the block
            if lines[i].strip():
                body.append(lines[i].strip())
            i += 1
        if len(indent.expandtabs()) % 4 == 2:  # under a reST bullet ("* " + 2): Markdown nests blocks at 4
            indent += "  "
        out += ["", indent + "$$", *(indent + b for b in body), indent + "$$", ""]
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the package once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self.pkg, self.missing = pkg, []
        self._assigned_docstrings(pkg)
        self._walk(pkg)
        if self.missing:
            raise ValueError("docstring cross-references to nothing: " + "; ".join(self.missing))

    def _assigned_docstrings(self, obj) -> None:
        """A class whose docstring is built (``__doc__ = r\"\"\"...\"\"\" + _SHARED + ...``, surgery.py) gets it
        here: string literals and module-level string constants joined by ``+``, read with ``ast.literal_eval``."""
        for member in list(obj.members.values()):
            if member.is_alias:
                continue
            if member.is_class and member.docstring is None and "__doc__" in member.members:
                text = inspect.cleandoc(self._static_str(member.module, str(member.members["__doc__"].value)))
                ref = self.pkg.docstring
                member.docstring = griffe.Docstring(text, parent=member, parser=ref.parser,
                                                    parser_options=ref.parser_options)
            if member.is_module or member.is_class:
                self._assigned_docstrings(member)

    def _static_str(self, module, source: str) -> str:
        def value(node):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
                return value(node.left) + value(node.right)
            if isinstance(node, ast.Name):
                return self._static_str(module, str(module.members[node.id].value))
            return ast.literal_eval(node)

        return value(ast.parse(source, mode="eval").body)

    def _walk(self, obj) -> None:
        if obj.is_alias:
            return
        if obj.docstring is not None:
            obj.docstring.value = self._convert(obj, obj.docstring.value)
        for member in obj.members.values():
            self._walk(member)

    def _convert(self, obj, text: str) -> str:
        out, prose = [], []
        lines, i = text.split("\n"), 0
        while i < len(lines):
            if not lines[i].lstrip().startswith(">>>"):
                prose.append(lines[i])
                i += 1
                continue
            out.append(self._prose(obj, "\n".join(prose)))
            prose, indent, start = [], lines[i][: len(lines[i]) - len(lines[i].lstrip())], i
            while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
                i += 1
            # an example (prompts and printed output) verbatim, as a fenced block: what the doctests run
            out.append("\n".join([indent + "```pycon", *lines[start:i], indent + "```"]))
        out.append(self._prose(obj, "\n".join(prose)))
        return "\n".join(out)

    def _prose(self, obj, text: str) -> str:
        text = _math_blocks(text)
        text = _MATH.sub(lambda m: "$" + m[1] + "$", text)
        text = _ROLE.sub(lambda m: self._ref(obj, m[1], m[2] == "~", m[3]), text)
        return _LITERAL.sub(lambda m: "`" + m[1] + "`", text)

    def _find(self, path: str):
        try:
            return self.pkg[path[len(PACKAGE) + 1:]] if path != PACKAGE else self.pkg
        except (KeyError, ValueError, griffe.AliasResolutionError):
            return None

    def _lookup(self, obj, target: str):
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            return self._find(target)
        scope = obj
        while scope is not None:  # the docstring's own scope outwards, then the package's top level
            cls_bases = scope.mro() if scope.is_class else []
            for owner in (scope, *cls_bases):
                found = self._find(owner.path + "." + target) if owner.path.startswith(PACKAGE) else None
                if found is not None:
                    return found
            scope = scope.parent
        return None

    def _ref(self, obj, role: str, short: bool, target: str) -> str:
        target = "".join(target.split())  # a target may break across lines
        shown = target.rsplit(".", 1)[-1] if short else target
        found = self._lookup(obj, target)
        if found is None:
            if target.startswith(PACKAGE) or "." not in target and not target.startswith("_"):
                self.missing.append(f"{obj.path}: :{role}:`{target}`")
            return f"`{shown}`"
        try:
            final = found.final_target if found.is_alias else found
        except griffe.AliasResolutionError:
            return f"`{shown}`"
        public = all(not p.startswith("_") for p in final.path.split("."))
        if not public or not final.docstring:
            return f"`{shown}`"
        return f"[`{shown}`][{final.path}]"
