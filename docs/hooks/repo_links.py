"""mkdocs hook: links from a docs page to a repository file outside docs/ (`../hf_fusedce/ops/ce/api.py`,
`../model_cards/llama.md`) must name a file that exists, or the build fails (mkdocs itself checks only the links
that stay inside docs/). Such a link is rewritten for the site to the file in the repository browser
(`repo_url` + /blob/main/), or, while mkdocs.yml sets no `repo_url`, to a site-absolute path (what a local
checkout serves); on GitHub the page's relative link works as written. An image outside docs/ (a benchmark's
PNG) is copied into the site under `_repo/` so the page shows it."""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def outside_links(markdown: str, page_path: Path, docs_dir: Path):
    """(match, resolved path) of every relative link of `markdown` that leaves docs_dir; code fences skipped."""
    text = FENCE.sub(lambda m: " " * len(m.group(0)), markdown)
    for m in LINK.finditer(text):
        target = m.group(2).split("#", 1)[0]
        if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^/", target):
            continue
        resolved = (page_path.parent / target).resolve()
        if not resolved.is_relative_to(docs_dir.resolve()):
            yield m, resolved


IMAGE_DIR = "_repo/"


def _repo_root(config) -> Path:
    return Path(config.docs_dir).parent.resolve()


def on_files(files, config):
    """Add every image that a page takes from outside docs/ to the site, under _repo/<its repository path>."""
    docs_dir, root = Path(config.docs_dir), _repo_root(config)
    for page in [f for f in files if f.src_uri.endswith(".md")]:
        for m, resolved in outside_links(Path(page.abs_src_path).read_text(encoding="utf-8"),
                                         docs_dir / page.src_uri, docs_dir):
            if m.group(1).startswith("!") and resolved.is_file() and resolved.is_relative_to(root):
                uri = IMAGE_DIR + resolved.relative_to(root).as_posix()
                if files.get_file_from_path(uri) is None:
                    files.append(File.generated(config, uri, abs_src_path=str(resolved)))
    return files


def on_page_markdown(markdown, page, config, files):
    docs_dir, root = Path(config.docs_dir), _repo_root(config)
    base = config.repo_url.rstrip("/") + "/blob/main/" if config.repo_url else "/"
    pieces, last = [], 0
    for m, resolved in outside_links(markdown, docs_dir / page.file.src_uri, docs_dir):
        if not resolved.exists() or not resolved.is_relative_to(root):
            raise PluginError(f"docs/{page.file.src_uri}: the link {m.group(2)!r} names no file of the repository")
        anchor = "#" + m.group(2).split("#", 1)[1] if "#" in m.group(2) else ""
        rel = resolved.relative_to(root).as_posix()
        if m.group(1).startswith("!"):  # copied into the site by on_files: a docs-relative link
            depth = len(Path(page.file.src_uri).parent.parts)
            pieces += [markdown[last:m.start(2)], "../" * depth + IMAGE_DIR + rel]
        else:
            pieces += [markdown[last:m.start(2)], base + rel + anchor]
        last = m.end(2)
    return "".join(pieces) + markdown[last:]
