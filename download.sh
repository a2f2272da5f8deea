#!/usr/bin/env bash
# Download Llama weights and tokenizers using the presigned URL that Meta sends
# by email after you accept the license: Llama 2, Llama 3, and Llama 3.1, 3.2
# and 3.3, with the model names and server layouts of Meta's own downloaders.
#
# Interactive:  ./download.sh
# Unattended:   PRESIGNED_URL='https://download.llamameta.net/*?Policy=...' \
#               MODEL_SIZE=7B,7B-chat TARGET_FOLDER=weights ./download.sh
#               LLAMA_VERSION=3 MODEL_SIZE=8B-instruct PRESIGNED_URL=... ./download.sh
#               MODEL_SIZE=Llama3.2-1B,Llama3.1-8B-Instruct PRESIGNED_URL=... ./download.sh
#
# Environment variables (each one set skips the matching prompt):
#   PRESIGNED_URL  the URL from the email; its '*' is replaced by each file's path
#   MODEL_SIZE     comma-separated model names (below); empty means every model
#                  of LLAMA_VERSION's short names
#   TARGET_FOLDER  where to store the files (default: the current directory)
#   LLAMA_VERSION  2 (default) or 3: which family the short names mean, since
#                  Llama 2 and Llama 3 both have a "70B" (never prompted for)
#
# Model names (case-sensitive, as Meta's scripts spell them):
#   LLAMA_VERSION=2, Meta's Llama 2 download.sh:
#     7B 13B 70B 7B-chat 13B-chat 70B-chat
#     -> llama-2-7b/ etc.; one tokenizer.model for all, in TARGET_FOLDER
#   LLAMA_VERSION=3, Meta's Llama 3 download.sh (8b, 8B-Instruct, ... also work):
#     8B 8B-instruct 70B 70B-instruct
#     -> served from 8b_pre_trained/, 8b_instruction_tuned/, 70b_pre_trained/,
#        70b_instruction_tuned/; stored in Meta-Llama-3-8B/, Meta-Llama-3-8B-Instruct/,
#        Meta-Llama-3-70B/, Meta-Llama-3-70B-Instruct/, each with its tokenizer.model
#   Any LLAMA_VERSION, the model IDs of llama-models' `llama model download`:
#     Llama3.1-8B Llama3.1-8B-Instruct Llama3.1-70B Llama3.1-70B-Instruct
#     Llama3.1-405B Llama3.1-405B-Instruct                      (FP8, 8 shards)
#     Llama3.1-405B:bf16-mp8 Llama3.1-405B-Instruct:bf16-mp8    (BF16, 8 shards)
#     Llama3.1-405B:bf16-mp16 Llama3.1-405B-Instruct:bf16-mp16  (BF16, 16 shards)
#     Llama3.2-1B Llama3.2-1B-Instruct Llama3.2-3B Llama3.2-3B-Instruct
#     Llama3.3-70B-Instruct
#     -> served from Llama-3.1-8B/ etc. (Llama-3.1-405B-MP8/ for bf16-mp8, ...);
#        stored in a folder named after the ID, ':' replaced by '-'
#        (Llama3.1-405B-bf16-mp8/), each with its tokenizer.model
#
# Every downloaded file must be listed, with the right md5 sum, in the checklist
# served beside it (checklist.chk, or tokenizer_checklist.chk for Llama 2's
# shared tokenizer); anything else stops the script with a non-zero exit.
#
# Written for bash 3.2 too (macOS' /bin/bash): no associative arrays, no ${x,,}.

set -euo pipefail

LLAMA2_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"
LLAMA3_MODELS="8B,8B-instruct,70B,70B-instruct"
LLAMA_MODELS_IDS="Llama3.1-8B,Llama3.1-8B-Instruct,Llama3.1-70B,Llama3.1-70B-Instruct,\
Llama3.1-405B,Llama3.1-405B-Instruct,Llama3.1-405B:bf16-mp8,Llama3.1-405B-Instruct:bf16-mp8,\
Llama3.1-405B:bf16-mp16,Llama3.1-405B-Instruct:bf16-mp16,\
Llama3.2-1B,Llama3.2-1B-Instruct,Llama3.2-3B,Llama3.2-3B-Instruct,Llama3.3-70B-Instruct"
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

# The model table. model_info NAME prints, for a name valid under
# $LLAMA_VERSION, one line of seven fields:
#   <name> <family> <server folder> <local folder> <shards> <tokenizer> <scales>
# name: the canonical spelling (for duplicates); family: llama2, llama3 or
# llama-models, which decides the top-level files; shards: the number of
# consolidated.NN.pth files (the model-parallel size; llama-models'
# pth_file_count); tokenizer: 'shared' (Llama 2's top-level tokenizer.model)
# or 'own' (a tokenizer.model in the model's folder); scales: 'fp8' when each
# shard N comes with fp8_scales_N.pt (the FP8 405B models), else '-'.
model_info() {
    case $LLAMA_VERSION:$1 in
        2:7B)        echo "7B llama2 llama-2-7b llama-2-7b 1 shared -" ;;
        2:13B)       echo "13B llama2 llama-2-13b llama-2-13b 2 shared -" ;;
        2:70B)       echo "70B llama2 llama-2-70b llama-2-70b 8 shared -" ;;
        2:7B-chat)   echo "7B-chat llama2 llama-2-7b-chat llama-2-7b-chat 1 shared -" ;;
        2:13B-chat)  echo "13B-chat llama2 llama-2-13b-chat llama-2-13b-chat 2 shared -" ;;
        2:70B-chat)  echo "70B-chat llama2 llama-2-70b-chat llama-2-70b-chat 8 shared -" ;;

        3:8B | 3:8b)
            echo "8B llama3 8b_pre_trained Meta-Llama-3-8B 1 own -" ;;
        3:8B-instruct | 3:8b-instruct | 3:8B-Instruct | 3:8b-Instruct)
            echo "8B-instruct llama3 8b_instruction_tuned Meta-Llama-3-8B-Instruct 1 own -" ;;
        3:70B | 3:70b)
            echo "70B llama3 70b_pre_trained Meta-Llama-3-70B 8 own -" ;;
        3:70B-instruct | 3:70b-instruct | 3:70B-Instruct | 3:70b-Instruct)
            echo "70B-instruct llama3 70b_instruction_tuned Meta-Llama-3-70B-Instruct 8 own -" ;;

        # llama-models' IDs, valid under either LLAMA_VERSION.
        [23]:Llama3.1-8B)                       echo "Llama3.1-8B llama-models Llama-3.1-8B Llama3.1-8B 1 own -" ;;
        [23]:Llama3.1-8B-Instruct)              echo "Llama3.1-8B-Instruct llama-models Llama-3.1-8B-Instruct Llama3.1-8B-Instruct 1 own -" ;;
        [23]:Llama3.1-70B)                      echo "Llama3.1-70B llama-models Llama-3.1-70B Llama3.1-70B 8 own -" ;;
        [23]:Llama3.1-70B-Instruct)             echo "Llama3.1-70B-Instruct llama-models Llama-3.1-70B-Instruct Llama3.1-70B-Instruct 8 own -" ;;
        [23]:Llama3.1-405B)                     echo "Llama3.1-405B llama-models Llama-3.1-405B Llama3.1-405B 8 own fp8" ;;
        [23]:Llama3.1-405B-Instruct)            echo "Llama3.1-405B-Instruct llama-models Llama-3.1-405B-Instruct Llama3.1-405B-Instruct 8 own fp8" ;;
        [23]:Llama3.1-405B:bf16-mp8)            echo "Llama3.1-405B:bf16-mp8 llama-models Llama-3.1-405B-MP8 Llama3.1-405B-bf16-mp8 8 own -" ;;
        [23]:Llama3.1-405B-Instruct:bf16-mp8)   echo "Llama3.1-405B-Instruct:bf16-mp8 llama-models Llama-3.1-405B-Instruct-MP8 Llama3.1-405B-Instruct-bf16-mp8 8 own -" ;;
        [23]:Llama3.1-405B:bf16-mp16)           echo "Llama3.1-405B:bf16-mp16 llama-models Llama-3.1-405B-MP16 Llama3.1-405B-bf16-mp16 16 own -" ;;
        [23]:Llama3.1-405B-Instruct:bf16-mp16)  echo "Llama3.1-405B-Instruct:bf16-mp16 llama-models Llama-3.1-405B-Instruct-MP16 Llama3.1-405B-Instruct-bf16-mp16 16 own -" ;;
        [23]:Llama3.2-1B)                       echo "Llama3.2-1B llama-models Llama-3.2-1B Llama3.2-1B 1 own -" ;;
        [23]:Llama3.2-1B-Instruct)              echo "Llama3.2-1B-Instruct llama-models Llama-3.2-1B-Instruct Llama3.2-1B-Instruct 1 own -" ;;
        [23]:Llama3.2-3B)                       echo "Llama3.2-3B llama-models Llama-3.2-3B Llama3.2-3B 1 own -" ;;
        [23]:Llama3.2-3B-Instruct)              echo "Llama3.2-3B-Instruct llama-models Llama-3.2-3B-Instruct Llama3.2-3B-Instruct 1 own -" ;;
        [23]:Llama3.3-70B-Instruct)             echo "Llama3.3-70B-Instruct llama-models Llama-3.3-70B-Instruct Llama3.3-70B-Instruct 8 own -" ;;
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

# fetch PATH DEST [--continue]: download PATH (what replaces the URL's '*')
# into TARGET_FOLDER/DEST, stopping with a clear message on any failure.
fetch() {
    local path=$1 dest=$TARGET_FOLDER/$2 url status=0
    url=${PRESIGNED_URL/'*'/"$path"}
    # Options are passed unquoted on purpose: $WGET_PROGRESS is a single word
    # and "${3:-}" may be empty.
    # shellcheck disable=SC2086
    wget ${3:-} $WGET_PROGRESS -O "$dest" "$url" || status=$?
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

LLAMA_VERSION=$(trim "${LLAMA_VERSION:-2}")
case $LLAMA_VERSION in
    2) SHORT_MODELS=$LLAMA2_MODELS ;;
    3) SHORT_MODELS=$LLAMA3_MODELS ;;
    *) die "LLAMA_VERSION must be 2 (Llama 2's model names) or 3 (Llama 3's), not '$LLAMA_VERSION'." ;;
esac
VALID_NAMES="${SHORT_MODELS//,/, } (with LLAMA_VERSION=$LLAMA_VERSION), and llama-models' IDs ${LLAMA_MODELS_IDS//,/, }"

if [ -z "${MODEL_SIZE+set}" ]; then
    read -r -p "Enter the list of models to download, comma-separated (Llama $LLAMA_VERSION: $SHORT_MODELS; or llama-models IDs such as Llama3.1-8B; set LLAMA_VERSION=2 or 3 for the other short names), or press Enter for all Llama $LLAMA_VERSION ones: " MODEL_SIZE || true
    echo
fi
MODEL_SIZE=$(trim "${MODEL_SIZE:-}")
[ -n "$MODEL_SIZE" ] || MODEL_SIZE=$SHORT_MODELS

TARGET_FOLDER=${TARGET_FOLDER:-.}

# --- Check everything before downloading anything ------------------------

# Split the list, trim each name, drop empty entries and duplicates, and
# reject unknown names. MODELS gets the canonical names; FAMILIES the
# families they belong to.
MODELS=""
FAMILIES=""
unknown=""
hint=""
rest="$MODEL_SIZE,"
while [ -n "$rest" ]; do
    m=$(trim "${rest%%,*}")
    rest=${rest#*,}
    [ -n "$m" ] || continue
    if ! info=$(model_info "$m"); then
        unknown="${unknown:+$unknown, }'$m'"
        # A short name of the other version: say how to reach it.
        other=$((5 - LLAMA_VERSION))
        if LLAMA_VERSION=$other model_info "$m" >/dev/null; then
            hint="
'$m' is a Llama $other name: run with LLAMA_VERSION=$other to download it."
        fi
        continue
    fi
    # shellcheck disable=SC2086  # the seven fields have no spaces
    set -- $info
    case " $MODELS " in
        *" $1 "*) ;;
        *) MODELS="$MODELS $1" ;;
    esac
    case " $FAMILIES " in
        *" $2 "*) ;;
        *) FAMILIES="$FAMILIES $2" ;;
    esac
done
if [ -n "$unknown" ]; then
    die "Unknown model name(s) for LLAMA_VERSION=$LLAMA_VERSION: $unknown.$hint
Valid names are: $VALID_NAMES."
fi
[ -n "$MODELS" ] || die "No model names given. Valid names are: $VALID_NAMES."

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

# The top-level files of each family: Meta's Llama 2 script fetches the
# license, the policy and the tokenizer shared by all models; its Llama 3
# script the license and policy only; llama-models' CLI nothing outside the
# model's folder. (Llama 2 and Llama 3 short names never mix in one run.)
case " $FAMILIES " in
    *" llama2 "*)
        echo "Downloading LICENSE and Acceptable Usage Policy"
        fetch LICENSE LICENSE
        fetch USE_POLICY.md USE_POLICY.md

        echo "Downloading tokenizer"
        fetch tokenizer.model tokenizer.model
        fetch tokenizer_checklist.chk tokenizer_checklist.chk
        verify "$TARGET_FOLDER" tokenizer_checklist.chk tokenizer.model
        ;;
esac
case " $FAMILIES " in
    *" llama3 "*)
        echo "Downloading LICENSE and Acceptable Usage Policy"
        fetch LICENSE LICENSE
        fetch USE_POLICY USE_POLICY
        ;;
esac

for m in $MODELS; do
    # shellcheck disable=SC2046  # the seven fields have no spaces
    set -- $(model_info "$m")
    remote=$3 folder=$4 shards=$5 tokenizer=$6 scales=$7
    echo "Downloading $m into $TARGET_FOLDER/$folder"
    mkdir -p "$TARGET_FOLDER/$folder"
    files=""
    s=0
    while [ "$s" -lt "$shards" ]; do
        files="$files consolidated.$(printf '%02d' "$s").pth"
        [ "$scales" != fp8 ] || files="$files fp8_scales_$s.pt"
        s=$((s + 1))
    done
    files="$files params.json"
    [ "$tokenizer" != own ] || files="$files tokenizer.model"
    for f in $files checklist.chk; do
        fetch "$remote/$f" "$folder/$f" --continue
    done
    # shellcheck disable=SC2086  # the names have no spaces
    verify "$TARGET_FOLDER/$folder" checklist.chk $files
done

echo "Done: all files downloaded and verified in $TARGET_FOLDER"
