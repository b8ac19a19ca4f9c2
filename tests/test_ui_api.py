"""``proxy/ui_api.py`` and the files of ``proxy/ui/``: which paths are served, and the rules
the pages keep so that the strict CSP holds (no inline script or style, no eval, no markup
built from strings, the key never in localStorage). The pages themselves run in a real
browser in ``tests/integration/test_ui.py``."""

from __future__ import annotations

import ast
import re
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath

import pytest

from proxy.ui_api import CONTENT_SECURITY_POLICY, CONTENT_TYPES, INDEX, UI_DIR, resolve, served_files

REPO_ROOT = Path(__file__).resolve().parents[1]
HTML_FILES = sorted(UI_DIR.glob("*.html"))
OWN_JS = sorted(UI_DIR.glob("*.js"))


FILES = served_files()


def test_index_is_the_playground() -> None:
    assert resolve("", FILES) == UI_DIR / INDEX
    assert resolve("status.html", FILES) == UI_DIR / "status.html"
    assert resolve("vendor/uPlot.esm.js", FILES) == UI_DIR / "vendor" / "uPlot.esm.js"
    assert resolve("vendor/", FILES) is None  # no index below the top


@pytest.mark.parametrize("name", [
    "../ui_api.py", "vendor/../../app.py", "..", ".hidden", "vendor/.x.js", "vendor",
    "vendor/uPlot.LICENSE", "missing.js", "a//b.js", "/etc/passwd", "./playground.html",
])
def test_paths_outside_the_served_files_are_refused(name: str) -> None:
    assert resolve(name, FILES) is None


def test_only_plain_files_of_served_types_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "ui"
    (root / "vendor").mkdir(parents=True)
    (root / ".git").mkdir()
    (tmp_path / "secret.js").write_text("x")
    (root / "link.js").symlink_to(tmp_path / "secret.js")
    for name in ("ok.js", "vendor/lib.js", "notes.txt", ".env.js", ".git/x.js", "playground.html"):
        (root / name).write_text("y")
    assert sorted(served_files(root)) == ["ok.js", "playground.html", "vendor/lib.js"]
    assert resolve("", served_files(root)) == (root / "playground.html").resolve()


def test_csp_is_strict() -> None:
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


class _InlineFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "style":
            self.problems.append("<style> element")
        if tag == "script":
            if "src" not in names:
                self.problems.append("inline <script>")
            self._in_script = True
        if "style" in names:
            self.problems.append(f"style attribute on <{tag}>")
        self.problems.extend(f"{name} handler on <{tag}>" for name in names if name.startswith("on"))
        href = dict(attrs).get("href") or ""
        if href.startswith("javascript:"):
            self.problems.append("javascript: URL")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False


@pytest.mark.parametrize("path", HTML_FILES, ids=lambda p: p.name)
def test_pages_have_no_inline_code(path: Path) -> None:
    finder = _InlineFinder()
    finder.feed(path.read_text(encoding="utf-8"))
    assert finder.problems == []


@pytest.mark.parametrize("path", OWN_JS, ids=lambda p: p.name)
def test_scripts_keep_the_rules(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    for pattern in (r"\binnerHTML\b", r"\bouterHTML\b", r"insertAdjacentHTML", r"\beval\(",
                    r"new Function\(", r"document\.write", r"localStorage", r"setAttribute\(\"style"):
        assert not re.search(pattern, source), f"{path.name}: {pattern}"


def package_data_globs() -> list[str]:
    """The globs setup.py ships with the ``proxy`` package."""
    for node in ast.walk(ast.parse((REPO_ROOT / "setup.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.keyword) and node.arg == "package_data":
            return list(ast.literal_eval(node.value)["proxy"])
    raise AssertionError("setup.py has no package_data")


def test_every_ui_file_is_package_data_and_served() -> None:
    """setup.py's package_data globs cover every file under proxy/ui (so an installed wheel
    serves the same pages), and every file but the licence has a served type."""
    globs = package_data_globs()
    for path in UI_DIR.rglob("*"):
        if path.is_file():
            relative = PurePosixPath(path.relative_to(UI_DIR.parent).as_posix())
            assert any(relative.match(g) for g in globs), relative
            assert path.suffix in CONTENT_TYPES or path.name.endswith("LICENSE"), relative
    assert (UI_DIR / "vendor" / "uPlot.LICENSE").read_text(encoding="utf-8").startswith("The MIT License")
