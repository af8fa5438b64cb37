"""mkdocs hook: a page links to a file of the repository outside docs/ (a benchmark record, a
source file) by its relative path, ``../benchmarks/records/x.json``, which works on a code host as
it is; the build copies each such file into the site under ``repo/`` and the link points there.
A link to a file that does not exist still fails ``mkdocs build --strict``."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

LINK = re.compile(r"\]\(\s*<?([^)\s#>]+)")


class RepoFile(File):
    """A repository file copied as it is (a Markdown record too: it is not a page of the site)."""

    def is_documentation_page(self) -> bool:
        return False


def on_files(files, config):
    docs = Path(config["docs_dir"]).resolve()
    root = docs.parent
    for page in list(files.documentation_pages()):
        for target in LINK.findall(page.content_string):
            if "://" in target or target.startswith(("mailto:", "/")):
                continue
            uri = posixpath.normpath(posixpath.join(posixpath.dirname(page.src_uri), target))
            path = (docs / uri).resolve()
            if not uri.startswith("../") or files.get_file_from_path(uri) or not path.is_file() \
                    or not path.is_relative_to(root):
                continue
            file = RepoFile(uri, None, config["site_dir"], config["use_directory_urls"],
                            dest_uri="repo/" + path.relative_to(root).as_posix(),
                            inclusion=InclusionLevel.INCLUDED)  # "../…" would match the dot-file exclusion
            file.abs_src_path = str(path)
            files.append(file)
    return files
