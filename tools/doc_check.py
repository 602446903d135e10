#!/usr/bin/env python3
"""Checks the project's pages: every relative link in README.md, BENCHMARKS.md and docs/*.md names a file or
folder that exists, and every #anchor a heading of its page (GitHub's rule: lower case, punctuation dropped,
spaces to hyphens, a repeated heading suffixed -1, -2, ...). A comment or page anywhere in the repository that
points to a section as `BENCHMARKS.md, "Section"` must name one of its headings, and README.md links every
page of docs/. Exits 1 with one line per problem.

    python3 tools/doc_check.py               # check the links
    python3 tools/doc_check.py --sentences   # per page: sentences over 35 and over 50 words (a report, never fails)
"""
import argparse
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def pages():
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md"] + sorted((ROOT / "docs").glob("*.md"))


def prose(text, code=""):
    """The page without its fenced code blocks, and its inline code spans replaced by `code` (links there are
    examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", code, text)


def anchors(page):
    seen, out = {}, set()
    fenced = False
    for line in page.read_text().split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links():
    bad = []
    for page in pages():
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                bad.append(f"{where}: no such file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                bad.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return bad


def broken_section_names():
    """`BENCHMARKS.md, "Section"` in any tracked text file (the raw runs under bench/results aside)."""
    heads = set()
    for line in (ROOT / "BENCHMARKS.md").read_text().split("\n"):
        m = re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if m:
            heads.add(m.group(1))
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = []
    for name in files:
        if name.startswith("bench/results/") or name == "tools/doc_check.py" or name.endswith((".gz", ".png")):
            continue
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for m in re.finditer(r'BENCHMARKS\.md[,:]?\s*(?:(?://|#)\s*)?"([^"]+)"', text):
            if m.group(1) not in heads:
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f'{name}:{line}: no section "{m.group(1)}" in BENCHMARKS.md')
    return bad


def unlisted_docs():
    """The pages of docs/ that README.md does not link."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(prose((ROOT / "README.md").read_text()))}
    return [f"README.md: its documentation list lacks {p.relative_to(ROOT)}"
            for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]


def sentences(page):
    """Words per sentence of the page's prose and table cells: headings, code blocks and link targets left out,
    an inline code span counted as one word."""
    text = prose(page.read_text(), code="Code")  # one word, and a sentence may start with it
    text = re.sub(r"\]\([^)]*\)", "]", text)
    lines = []
    for line in text.split("\n"):
        if line.lstrip().startswith("|"):  # a table row: each cell a paragraph of its own
            if not re.match(r"^\s*\|[\s:|-]*$", line):
                lines += ["", *line.strip().strip("|").replace("\\|", "/").split("|"), ""]
        elif not line.lstrip().startswith(("#", "<!--")):
            lines.append(line)
    text = re.sub(r"^\s*(?:[-*]|\d+\.)\s+", "\n\n", "\n".join(lines), flags=re.M)  # a list item starts anew
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        for s in re.split(r"(?<=[.!?:;])\s+(?=[A-Z*(\[])", para):
            words = len(re.findall(r"[\w'.,/+-]+", s))
            if words:
                out.append(words)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", action="store_true", help="report sentence lengths per page instead")
    args = ap.parse_args()
    if args.sentences:
        total = [0, 0, 0]
        print(f"{'page':32} {'sentences':>9} {'>35 words':>9} {'>50 words':>9}")
        for page in pages():
            n = sentences(page)
            row = [len(n), sum(w > 35 for w in n), sum(w > 50 for w in n)]
            total = [a + b for a, b in zip(total, row)]
            print(f"{str(page.relative_to(ROOT)):32} {row[0]:9} {row[1]:9} {row[2]:9}")
        print(f"{'all':32} {total[0]:9} {total[1]:9} {total[2]:9}")
        return 0
    bad = broken_links() + broken_section_names() + unlisted_docs()
    for line in bad:
        print(line, file=sys.stderr)
    print(f"doc_check: {len(pages())} pages, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
