#!/usr/bin/env bash
# Download the Llama 2 weights and tokenizer using the presigned URL that Meta
# sends by email after you accept the license.
#
# Interactive:  ./download.sh
# Unattended:   PRESIGNED_URL='https://download.llamameta.net/*?Policy=...' \
#               MODEL_SIZE=7B,7B-chat TARGET_FOLDER=weights ./download.sh
#
# Environment variables (each one set skips the matching prompt):
#   PRESIGNED_URL  the URL from the email; its '*' is replaced by each file's path
#   MODEL_SIZE     comma-separated models to fetch; empty means all of them
#   TARGET_FOLDER  where to store the files (default: the current directory)
#
# Written for bash 3.2 too (macOS' /bin/bash): no associative arrays, no ${x,,}.

set -euo pipefail

ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"
NEW_LINK_PAGE="https://ai.meta.com/resources/models-and-libraries/llama-downloads/"

die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

# Stop with the advice that fits a refused download or an error page.
link_expired() {
    die "$1
The download link has probably expired (or was not copied completely).
Please request a new link from Meta's website: $NEW_LINK_PAGE"
}

# Strip leading and trailing whitespace.
trim() {
    local s=$1
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    printf '%s' "$s"
}

# Model name -> "<folder> <number of checkpoint shards>" (model parallel size).
model_info() {
    case $1 in
        7B)       echo "llama-2-7b 1" ;;
        13B)      echo "llama-2-13b 2" ;;
        70B)      echo "llama-2-70b 8" ;;
        7B-chat)  echo "llama-2-7b-chat 1" ;;
        13B-chat) echo "llama-2-13b-chat 2" ;;
        70B-chat) echo "llama-2-70b-chat 8" ;;
        *) return 1 ;;
    esac
}

# True when a file starts like an HTML page or an XML error (what S3 sends for
# an expired signature) instead of the data we asked for.
looks_like_error_page() {
    local start
    start=$(head -c 256 "$1" | LC_ALL=C tr -d '\000[:space:]' | LC_ALL=C tr '[:upper:]' '[:lower:]')
    case $start in
        '<!doctypehtml'* | '<html'* | '<?xml'*) return 0 ;;
    esac
    return 1
}

# fetch PATH [--continue]: download PATH (relative to the URL's '*') into
# TARGET_FOLDER/PATH, stopping with a clear message on any failure.
fetch() {
    local path=$1 dest=$TARGET_FOLDER/$1 url status=0
    url=${PRESIGNED_URL/'*'/"$path"}
    # Options are passed unquoted on purpose: $WGET_PROGRESS is a single word
    # and "${2:-}" may be empty.
    # shellcheck disable=SC2086
    wget ${2:-} $WGET_PROGRESS -O "$dest" "$url" || status=$?
    if [ "$status" -ne 0 ]; then
        [ -s "$dest" ] || rm -f "$dest"    # don't leave an empty file behind
        if [ "$status" -eq 8 ]; then       # wget: the server answered with an error (403, ...)
            link_expired "The server refused to send $path (see wget's message above)."
        fi
        die "Downloading $path failed (wget exit status $status)."
    fi
    if looks_like_error_page "$dest"; then
        rm -f "$dest"    # otherwise a re-run with --continue would append to it
        link_expired "Received an HTML/XML error page instead of $path."
    fi
}

# True when $1 is 32 hex digits, the form of an md5 sum.
is_md5() {
    [ "${#1}" -eq 32 ] || return 1
    case $1 in
        *[!0-9a-fA-F]*) return 1 ;;
    esac
    return 0
}

# True when $1 names a file directly inside the folder being checked: not
# empty, no '/' (so no absolute path and no sub-folder), not '.' or '..', no
# leading '-' (it would read as an option), no '\' (md5sum's escape marker).
is_plain_name() {
    case $1 in
        '' | . | .. | */* | -* | *\\*) return 1 ;;
    esac
    return 0
}

# file_md5 FILE: print the md5 sum of FILE.
file_md5() {
    local out
    case $1 in
        -*) set -- "./$1" ;;    # not an option
    esac
    if [ "$MD5_TOOL" = md5sum ]; then
        out=$(md5sum < "$1")
    else
        out=$(md5 -r "$1")    # macOS: "<md5> <file>"
    fi
    printf '%s' "${out%% *}"
}

# verify DIR CHECKLIST FILE...: check the md5 sums listed in DIR/CHECKLIST
# ("<md5>  <file>" lines, as md5sum writes them). Each FILE (what was
# downloaded into DIR) must be listed there: a checker that only looks at the
# lines present would call an unlisted file verified. Every listed name must
# be a plain file name in DIR, so a checklist cannot point outside it.
verify() {
    local dir=$1 list=$2 sum name entries="" listed=$'\n' missing="" failed="" f
    shift 2
    echo "Checking checksums in $dir/$list"
    [ -f "$dir/$list" ] || die "Checksum list $dir/$list is missing."
    while read -r sum name || [ -n "$sum" ]; do
        [ -n "$sum" ] || continue
        name=${name%$'\r'}
        name=${name#\*}    # md5sum's binary-mode marker
        is_md5 "$sum" && [ -n "$name" ] ||
            die "Malformed line in $dir/$list: '$sum${name:+ $name}' (expected '<md5>  <file name>').
The checklist is corrupted: run this script again."
        is_plain_name "$name" ||
            die "$dir/$list lists '$name', which is not a plain file name inside $dir (no '/', no '..', no absolute path, no leading '-').
Refusing to use this checklist: it is corrupted or has been tampered with."
        entries="$entries$sum $name"$'\n'
        listed="$listed$name"$'\n'
    done < "$dir/$list"
    for f in "$@"; do
        case $listed in
            *$'\n'"$f"$'\n'*) ;;
            *) missing="$missing$f " ;;
        esac
    done
    if [ -n "$missing" ]; then
        die "$dir/$list has no checksum for: $(trim "$missing")
Those files cannot be verified, so they are not trusted: the checklist is incomplete or has been tampered with."
    fi
    while read -r sum name; do
        [ -n "$sum" ] || continue
        if [ -f "$dir/$name" ] && [ "$(file_md5 "$dir/$name")" = "$(printf '%s' "$sum" | LC_ALL=C tr '[:upper:]' '[:lower:]')" ]; then
            echo "$name: OK"
        else
            echo "$name: FAILED"
            failed="$failed$name "
        fi
    done <<< "$entries"
    if [ -n "$failed" ]; then
        die "Checksum verification failed in $dir for: $(trim "$failed")
The file is corrupted or incomplete: delete it and run this script again."
    fi
}

# --- Ask for (or read) the settings --------------------------------------

if [ -z "${PRESIGNED_URL:-}" ]; then
    read -r -p "Enter the URL from email: " PRESIGNED_URL || true
    echo
fi
PRESIGNED_URL=$(trim "${PRESIGNED_URL:-}")
[ -n "$PRESIGNED_URL" ] || die "No download URL given: set PRESIGNED_URL or paste the URL from Meta's email at the prompt."
case $PRESIGNED_URL in
    *'*'*) ;;
    *) die "The URL must contain a '*' (it is a template): copy the whole URL from Meta's email." ;;
esac

if [ -z "${MODEL_SIZE+set}" ]; then
    read -r -p "Enter the list of models to download, comma-separated ($ALL_MODELS), or press Enter for all: " MODEL_SIZE || true
    echo
fi
MODEL_SIZE=$(trim "${MODEL_SIZE:-}")
[ -n "$MODEL_SIZE" ] || MODEL_SIZE=$ALL_MODELS

TARGET_FOLDER=${TARGET_FOLDER:-.}

# --- Check everything before downloading anything ------------------------

# Split the list, trim each name, drop empty entries and duplicates, and
# reject unknown names.
MODELS=""
unknown=""
rest="$MODEL_SIZE,"
while [ -n "$rest" ]; do
    m=$(trim "${rest%%,*}")
    rest=${rest#*,}
    [ -n "$m" ] || continue
    if ! model_info "$m" >/dev/null; then
        unknown="${unknown:+$unknown, }'$m'"
        continue
    fi
    case " $MODELS " in
        *" $m "*) ;;
        *) MODELS="$MODELS $m" ;;
    esac
done
if [ -n "$unknown" ]; then
    die "Unknown model name(s): $unknown. Valid names are: ${ALL_MODELS//,/, }."
fi
[ -n "$MODELS" ] || die "No model names given. Valid names are: ${ALL_MODELS//,/, }."

command -v wget >/dev/null 2>&1 ||
    die "wget is required but not installed (e.g. 'apt-get install wget' or 'brew install wget')."

if command -v md5sum >/dev/null 2>&1; then
    MD5_TOOL=md5sum
elif [ "$(uname -s)" = Darwin ] && command -v md5 >/dev/null 2>&1; then
    MD5_TOOL=md5
else
    die "Neither 'md5sum' nor macOS' 'md5' was found, so downloads could not be verified."
fi

# Progress bar on a terminal; one line per file in logs.
if [ -t 2 ]; then
    WGET_PROGRESS=--progress=bar
else
    WGET_PROGRESS=--no-verbose
fi

# --- Download ---------------------------------------------------------------

mkdir -p "$TARGET_FOLDER"

echo "Downloading LICENSE and Acceptable Usage Policy"
fetch LICENSE
fetch USE_POLICY.md

echo "Downloading tokenizer"
fetch tokenizer.model
fetch tokenizer_checklist.chk
verify "$TARGET_FOLDER" tokenizer_checklist.chk tokenizer.model

for m in $MODELS; do
    info=$(model_info "$m")
    folder=${info% *}
    shards=${info#* }
    echo "Downloading $m into $TARGET_FOLDER/$folder"
    mkdir -p "$TARGET_FOLDER/$folder"
    files=""
    s=0
    while [ "$s" -lt "$shards" ]; do
        files="$files consolidated.$(printf '%02d' "$s").pth"
        s=$((s + 1))
    done
    files="$files params.json"
    for f in $files checklist.chk; do
        fetch "$folder/$f" --continue
    done
    # shellcheck disable=SC2086  # the names have no spaces
    verify "$TARGET_FOLDER/$folder" checklist.chk $files
done

echo "Done: all files downloaded and verified in $TARGET_FOLDER"
