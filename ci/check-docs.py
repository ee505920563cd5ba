#!/usr/bin/env python3
"""Checks the links between README.md and docs/*.md: every relative link
names a file that exists, and every #anchor a heading of that file
(GitHub's slugs). Prints what is broken; exits 1 if anything is."""
import os
import re
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
pages = ["README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(root, "docs")) if f.endswith(".md")
)


def slug(heading):
    t = heading.lstrip("#").strip().lower()
    t = re.sub(r"[`*_]", "", t)
    t = re.sub(r"[^a-z0-9 \-]", "", t)
    return t.replace(" ", "-")


def anchors(path):
    found, fence = set(), False
    for line in open(os.path.join(root, path), encoding="utf-8"):
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"^#+ ", line):
            found.add(slug(line))
    return found


broken = []
for page in pages:
    text = open(os.path.join(root, page), encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(root, dest)):
            broken.append(f"{page}: {target}: no file {dest}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{page}: {target}: no heading #{anchor} in {dest}")
for b in broken:
    print(b)
print(f"docs links: {len(pages)} pages, {len(broken)} broken")
sys.exit(1 if broken else 0)
