#!/usr/bin/env bash
# Fetch the training text of the demo model (llama/demo/) reproducibly.
#
# Source: the English fortune cookie files of Debian's `fortunes` and `fortunes-min` packages, version
# 1:1.99.1-7.3 (Debian 12 "bookworm"), pinned by SHA-256. The offensive sets live in the separate
# `fortunes-off` package, which is never downloaded. License: BSD (see data/fortunes-copyright after a run).
#
# Output (all under data/, which git ignores):
#   data/debs/*.deb             the two packages, as downloaded
#   data/fortunes-copyright     the packages' copyright file
#   data/fortunes.jsonl         one fortune per line: {"file": ..., "index": ..., "text": ...}
#
# Usage: tools/get_demo_data.sh [DATA_DIR]     (default: data/ at the repository root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${1:-$ROOT/data}"
PYTHON="${PYTHON:-python3}"

VERSION="1:1.99.1-7.3"
FILE_VERSION="1.99.1-7.3"  # the epoch is not part of the pool file name
POOL="https://deb.debian.org/debian/pool/main/f/fortune-mod"
declare -A SHA256=(
    [fortunes]=41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5
    [fortunes-min]=9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07
)
# Files left out: ascii-art holds pictures, translate-me holds Latin.
EXCLUDE="ascii-art translate-me"

mkdir -p "$DATA/debs"
for pkg in fortunes fortunes-min; do
    deb="$DATA/debs/${pkg}_${FILE_VERSION}_all.deb"
    if [[ ! -f "$deb" ]] || ! echo "${SHA256[$pkg]}  $deb" | sha256sum --check --status; then
        rm -f "$deb"
        tmp="$(mktemp -d)"
        # apt-get when this is a Debian system that still carries the pinned version, else the archive's pool.
        if command -v apt-get >/dev/null && (cd "$tmp" && apt-get download -q "$pkg=$VERSION" >/dev/null 2>&1); then
            mv "$tmp"/*.deb "$deb"
        elif command -v curl >/dev/null; then
            curl -sSfL -o "$deb" "$POOL/${pkg}_${FILE_VERSION}_all.deb"
        else
            wget -q -O "$deb" "$POOL/${pkg}_${FILE_VERSION}_all.deb"
        fi
        rm -rf "$tmp"
        echo "${SHA256[$pkg]}  $deb" | sha256sum --check --quiet
    fi
done

EXTRACT="$(mktemp -d)"
trap 'rm -rf "$EXTRACT"' EXIT
for deb in "$DATA"/debs/*.deb; do
    if command -v dpkg-deb >/dev/null; then
        dpkg-deb -x "$deb" "$EXTRACT"
    else  # a .deb is an ar archive holding data.tar.*
        (cd "$EXTRACT" && ar x "$deb" && tar -xf data.tar.* && rm -f data.tar.* control.tar.* debian-binary)
    fi
done
cp "$EXTRACT/usr/share/doc/fortunes/copyright" "$DATA/fortunes-copyright"

# One JSON line per fortune, in sorted file order then file order. The "%" separator lines are dropped,
# overstrike sequences (x BACKSPACE y, old terminal bold/underline) become y, other control characters except
# tab and newline are removed, trailing spaces and blank edge lines are trimmed.
"$PYTHON" - "$EXTRACT/usr/share/games/fortunes" "$DATA/fortunes.jsonl" "$EXCLUDE" <<'EOF'
import json, re, sys
from pathlib import Path

src, out, exclude = Path(sys.argv[1]), Path(sys.argv[2]), set(sys.argv[3].split())
files = sorted(p for p in src.iterdir() if p.is_file() and not p.is_symlink() and p.suffix == "" and p.name not in exclude)
n = 0
with out.open("w", encoding="utf-8") as f:
    for path in files:
        text = path.read_text(encoding="utf-8")
        while "\b" in text:
            text = re.sub(r"[^\n]\x08", "", text)
            text = text.replace("\b", "")
        text = re.sub(r"[^\t\n\x20-\x7e\u00a0-\U0010ffff]", "", text)
        chunks = re.split(r"^%\n", text + "\n", flags=re.M)
        index = 0
        for chunk in chunks:
            lines = [line.rstrip() for line in chunk.split("\n")]
            fortune = "\n".join(lines).strip("\n")
            if fortune.strip():
                f.write(json.dumps({"file": path.name, "index": index, "text": fortune}, ensure_ascii=False) + "\n")
                index += 1
                n += 1
print(f"wrote {n} fortunes from {len(files)} files to {out}")
EOF
