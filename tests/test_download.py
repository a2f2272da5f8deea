"""Tests for download.sh against a local HTTP server that plays Meta's CDN.

The presigned URL is a template whose '*' is replaced by each file's path, so
pointing it at 127.0.0.1 lets the real script run with real wget, offline.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "download.sh"

BASH = shutil.which("bash")
WGET = shutil.which("wget")
pytestmark = [
    pytest.mark.skipif(BASH is None, reason="bash is not installed"),
    pytest.mark.skipif(
        WGET is None, reason="wget is not installed (download.sh needs it)"
    ),
]

QUERY = "Policy=x&Signature=y"
EXPIRED_MSG = "request a new link"

HTML_PAGE = b"<!DOCTYPE html>\n<html><body><h1>Link expired</h1></body></html>\n"
S3_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>\n"
)

# Llama 2 model name -> (folder, number of shards), as download.sh maps them
MODELS = {
    "7B": ("llama-2-7b", 1),
    "13B": ("llama-2-13b", 2),
    "70B": ("llama-2-70b", 8),
    "7B-chat": ("llama-2-7b-chat", 1),
    "13B-chat": ("llama-2-13b-chat", 2),
    "70B-chat": ("llama-2-70b-chat", 8),
}

# Llama 3 and later keep a tokenizer.model in each model's folder, and the
# server's folder is not always the local one: name -> (server folder, local
# folder, shards[, "fp8"]).
# Meta's Llama 3 download.sh, with LLAMA_VERSION=3:
LLAMA3_MODELS = {
    "8B": ("8b_pre_trained", "Meta-Llama-3-8B", 1),
    "8B-instruct": ("8b_instruction_tuned", "Meta-Llama-3-8B-Instruct", 1),
    "70B": ("70b_pre_trained", "Meta-Llama-3-70B", 8),
    "70B-instruct": ("70b_instruction_tuned", "Meta-Llama-3-70B-Instruct", 8),
}
# llama-models' IDs (pth_file_count and server folders from its sku_list.py):
LLAMA_MODELS_IDS = {
    "Llama3.1-8B": ("Llama-3.1-8B", "Llama3.1-8B", 1),
    "Llama3.1-8B-Instruct": ("Llama-3.1-8B-Instruct", "Llama3.1-8B-Instruct", 1),
    "Llama3.1-70B": ("Llama-3.1-70B", "Llama3.1-70B", 8),
    "Llama3.1-70B-Instruct": ("Llama-3.1-70B-Instruct", "Llama3.1-70B-Instruct", 8),
    "Llama3.1-405B": ("Llama-3.1-405B", "Llama3.1-405B", 8, "fp8"),
    "Llama3.1-405B-Instruct": ("Llama-3.1-405B-Instruct", "Llama3.1-405B-Instruct", 8, "fp8"),
    "Llama3.1-405B:bf16-mp8": ("Llama-3.1-405B-MP8", "Llama3.1-405B-bf16-mp8", 8),
    "Llama3.1-405B-Instruct:bf16-mp8": (
        "Llama-3.1-405B-Instruct-MP8",
        "Llama3.1-405B-Instruct-bf16-mp8",
        8,
    ),
    "Llama3.1-405B:bf16-mp16": ("Llama-3.1-405B-MP16", "Llama3.1-405B-bf16-mp16", 16),
    "Llama3.1-405B-Instruct:bf16-mp16": (
        "Llama-3.1-405B-Instruct-MP16",
        "Llama3.1-405B-Instruct-bf16-mp16",
        16,
    ),
    "Llama3.2-1B": ("Llama-3.2-1B", "Llama3.2-1B", 1),
    "Llama3.2-1B-Instruct": ("Llama-3.2-1B-Instruct", "Llama3.2-1B-Instruct", 1),
    "Llama3.2-3B": ("Llama-3.2-3B", "Llama3.2-3B", 1),
    "Llama3.2-3B-Instruct": ("Llama-3.2-3B-Instruct", "Llama3.2-3B-Instruct", 1),
    "Llama3.3-70B-Instruct": ("Llama-3.3-70B-Instruct", "Llama3.3-70B-Instruct", 8),
}


def spec(name: str, version: int = 2) -> tuple[str, str, int, bool, bool]:
    """(server folder, local folder, shards, own tokenizer, fp8 scales)."""
    if name in LLAMA_MODELS_IDS:
        entry = LLAMA_MODELS_IDS[name]
    elif version == 3:
        entry = LLAMA3_MODELS[name]
    else:
        folder, shards = MODELS[name]
        return folder, folder, shards, False, False
    return entry[0], entry[1], entry[2], True, entry[3:] == ("fp8",)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def checklist(files: dict[str, bytes]) -> bytes:
    """A checklist in md5sum's own format: '<md5>  <name>' per line."""
    return "".join(f"{md5(data)}  {name}\n" for name, data in files.items()).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files under server.root; ignores the query string (the signature)."""

    def do_GET(self) -> None:
        srv = self.server
        split = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(split.path).lstrip("/")
        srv.requests.append((path, split.query))

        if path in srv.forbidden:
            return self._send(403, S3_ERROR, "application/xml")
        if path in srv.error_pages:
            # A 200 answer whose body is an error page, as some proxies/CDNs do.
            body = srv.error_pages[path]
            return self._send(200, body, "text/html")
        file = (srv.root / path).resolve()
        if not file.is_file() or srv.root not in file.parents:
            return self._send(404, b"not found\n", "text/plain")

        data = file.read_bytes()
        # Minimal 'Range: bytes=N-' support, enough for `wget --continue`.
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(206)
            self.send_header(
                "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"
            )
            return self._send_body(data[start:], "application/octet-stream")
        return self._send(200, data, "application/octet-stream")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self._send_body(body, ctype)

    def _send_body(self, body: bytes, ctype: str) -> None:
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass


class FakeCDN:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.root = root.resolve()
        self.httpd.requests = []
        self.httpd.forbidden = set()
        self.httpd.error_pages = {}
        # A short poll interval keeps shutdown() (and so each test) fast.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.02,), daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/*?{QUERY}"

        # Meta's top-level files; the tokenizer checklist is correct.
        self.write("LICENSE", b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (fake)\n")
        self.write("USE_POLICY.md", b"# Llama 2 Acceptable Use Policy (fake)\n")
        self.write("USE_POLICY", b"Llama 3 Acceptable Use Policy (fake)\n")
        self.write("tokenizer.model", b"\n\x0e\n\x05<unk>fake-sentencepiece\x00\x01")
        self.write(
            "tokenizer_checklist.chk",
            checklist({"tokenizer.model": self.read("tokenizer.model")}),
        )

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.httpd.requests

    @property
    def forbidden(self) -> set[str]:
        return self.httpd.forbidden

    @property
    def error_pages(self) -> dict[str, bytes]:
        return self.httpd.error_pages

    def write(self, path: str, data: bytes) -> None:
        file = self.root / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)

    def read(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def add_model(
        self,
        name: str,
        unlisted: tuple[str, ...] = (),
        extra: str = "",
        version: int = 2,
    ) -> list[str]:
        """Create a small fake model; returns the paths download.sh must fetch.

        Files named in `unlisted` are left out of its checklist.chk, and the
        `extra` lines are appended to it.
        """
        folder, _, shards, own_tokenizer, fp8 = spec(name, version)
        files = {}
        for s in range(shards):
            files[f"consolidated.{s:02d}.pth"] = b"PK\x03\x04" + f"{folder}-{s}".encode() * 50
            if fp8:
                files[f"fp8_scales_{s}.pt"] = b"PK\x03\x04" + f"scales-{s}".encode()
        files["params.json"] = (
            b'{"dim": 8, "n_layers": 1, "n_heads": 1, "vocab_size": -1}\n'
        )
        if own_tokenizer:
            files["tokenizer.model"] = f"fake tiktoken ranks for {folder}\n".encode()
        for fname, data in files.items():
            self.write(f"{folder}/{fname}", data)
        listed = {f: data for f, data in files.items() if f not in unlisted}
        self.write(f"{folder}/checklist.chk", checklist(listed) + extra.encode())
        return [f"{folder}/{fname}" for fname in [*files, "checklist.chk"]]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cdn(tmp_path):
    server = FakeCDN(tmp_path / "cdn")
    yield server
    server.close()


@pytest.fixture
def target(tmp_path):
    return tmp_path / "weights"


def run_download(cdn, target, model_size=None, url=None, path=None, **extra):
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.pop("MODEL_SIZE", None)
    env.pop("PRESIGNED_URL", None)
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    wgetrc = target.parent / "wgetrc"  # isolate from the user's ~/.wgetrc
    wgetrc.write_text("")
    env["WGETRC"] = str(wgetrc)
    env["PRESIGNED_URL"] = cdn.url if url is None else url
    env["TARGET_FOLDER"] = str(target)
    if model_size is not None:
        env["MODEL_SIZE"] = model_size
    if path is not None:
        env["PATH"] = path
    env.update(extra)
    proc = subprocess.run(
        [BASH, str(SCRIPT)],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=target.parent,
        timeout=60,
    )
    proc.output = proc.stdout + proc.stderr
    return proc


def fetched(cdn) -> list[str]:
    return [path for path, _ in cdn.requests]


def assert_same_files(cdn, target, paths):
    for p in paths:
        assert (target / p).read_bytes() == cdn.read(p), p


TOP_LEVEL = ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"]


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK), "download.sh must be executable"
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)


def test_download_7b(cdn, target):
    paths = cdn.add_model("7B")
    cdn.add_model("13B")  # present on the server, but not asked for

    proc = run_download(cdn, target, "7B")

    assert proc.returncode == 0, proc.output
    assert fetched(cdn) == TOP_LEVEL + paths
    assert_same_files(cdn, target, TOP_LEVEL + paths)
    # The signature in the query string is sent with every request.
    assert all(query == QUERY for _, query in cdn.requests)
    assert not (target / "llama-2-13b").exists()
    assert "consolidated.00.pth: OK" in proc.output


def test_download_13b_fetches_both_shards_and_trims_names(cdn, target):
    paths = cdn.add_model("13B")

    proc = run_download(cdn, target, "  13B ,")

    assert proc.returncode == 0, proc.output
    assert "llama-2-13b/consolidated.00.pth" in fetched(cdn)
    assert "llama-2-13b/consolidated.01.pth" in fetched(cdn)
    assert "llama-2-13b/consolidated.02.pth" not in fetched(cdn)
    assert_same_files(cdn, target, paths)


def test_empty_model_size_downloads_all_models(cdn, target):
    paths = [p for name in MODELS for p in cdn.add_model(name)]

    proc = run_download(cdn, target, "")

    assert proc.returncode == 0, proc.output
    assert sorted(fetched(cdn)) == sorted(TOP_LEVEL + paths)
    assert_same_files(cdn, target, paths)
    assert (target / "llama-2-70b-chat" / "consolidated.07.pth").is_file()


def test_rerun_resumes_without_redownloading(cdn, target):
    paths = cdn.add_model("7B")
    assert run_download(cdn, target, "7B").returncode == 0

    # Simulate an interrupted download of the shard: keep only its first half.
    shard = target / "llama-2-7b" / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:100])

    proc = run_download(cdn, target, "7B")

    assert proc.returncode == 0, proc.output
    assert_same_files(cdn, target, TOP_LEVEL + paths)


def test_corrupted_shard_fails_checksum(cdn, target):
    cdn.add_model("7B")
    cdn.write(
        "llama-2-7b/consolidated.00.pth",
        b"PK\x03\x04 these bytes do not match checklist.chk",
    )

    proc = run_download(cdn, target, "7B")

    assert proc.returncode != 0
    assert "checksum" in proc.stderr.lower()
    assert "consolidated.00.pth" in proc.stderr
    assert "Done" not in proc.stdout


def test_corrupted_tokenizer_fails_before_models(cdn, target):
    cdn.add_model("7B")
    cdn.write("tokenizer.model", b"not the tokenizer")

    proc = run_download(cdn, target, "7B")

    assert proc.returncode != 0
    assert "checksum" in proc.stderr.lower()
    assert "tokenizer.model" in proc.stderr
    assert not any(p.startswith("llama-2-7b/") for p in fetched(cdn))


@pytest.mark.parametrize(
    ("model", "unlisted"),
    [
        ("7B", "consolidated.00.pth"),
        ("13B", "consolidated.01.pth"),
        ("7B", "params.json"),
    ],
)
def test_file_left_out_of_checklist_fails(cdn, target, model, unlisted):
    folder = MODELS[model][0]
    cdn.add_model(model, unlisted=(unlisted,))
    # Corrupt it too: a checker that reads only the lines present says OK.
    cdn.write(f"{folder}/{unlisted}", b"PK\x03\x04 not the real file")

    proc = run_download(cdn, target, model)

    assert proc.returncode != 0, proc.output
    assert "no checksum for: " + unlisted in proc.stderr
    assert f"{folder}/checklist.chk" in proc.stderr
    assert "Done" not in proc.stdout


def test_tokenizer_left_out_of_its_checklist_fails(cdn, target):
    cdn.add_model("7B")
    cdn.write("tokenizer.model", b"not the tokenizer")
    cdn.write("tokenizer_checklist.chk", checklist({"LICENSE": cdn.read("LICENSE")}))

    proc = run_download(cdn, target, "7B")

    assert proc.returncode != 0, proc.output
    assert "no checksum for: tokenizer.model" in proc.stderr
    assert not any(p.startswith("llama-2-7b/") for p in fetched(cdn))


PLANTED = b"a file the checklist should not reach\n"


@pytest.mark.parametrize(
    ("listed", "planted"),
    [
        ("../x", "x"),
        ("{target}/x", "x"),  # an absolute path
        ("sub/x", "llama-2-7b/sub/x"),
        ("-x", "llama-2-7b/-x"),
        ("/etc/passwd", None),
    ],
)
def test_checklist_name_outside_the_model_folder_fails(cdn, target, listed, planted):
    listed = listed.format(target=target)
    if planted is None:  # an existing file outside the target folder
        if not os.access(listed, os.R_OK):
            pytest.skip(f"{listed} is not readable")
        data = Path(listed).read_bytes()
    else:
        # Plant a matching file where the name leads, so that a checker that
        # follows the name would report it OK.
        data = PLANTED
        (target / planted).parent.mkdir(parents=True, exist_ok=True)
        (target / planted).write_bytes(data)
    cdn.add_model("7B", extra=f"{md5(data)}  {listed}\n")

    proc = run_download(cdn, target, "7B")

    assert proc.returncode != 0, proc.output
    assert f"'{listed}', which is not a plain file name" in proc.stderr
    assert "llama-2-7b/checklist.chk" in proc.stderr
    assert "Done" not in proc.stdout


def test_checklist_in_md5sum_binary_mode_with_crlf_passes(cdn, target):
    paths = cdn.add_model("13B")
    text = cdn.read("llama-2-13b/checklist.chk").decode()
    lines = [line.split("  ", 1) for line in text.splitlines()]
    cdn.write(
        "llama-2-13b/checklist.chk",
        "".join(f"{s.upper()} *{n}\r\n" for s, n in lines).encode(),
    )

    proc = run_download(cdn, target, "13B")

    assert proc.returncode == 0, proc.output
    assert "consolidated.01.pth: OK" in proc.output
    assert_same_files(cdn, target, paths)


def test_malformed_checklist_line_fails(cdn, target):
    cdn.add_model("7B", extra="not-an-md5  params.json\n")

    proc = run_download(cdn, target, "7B")

    assert proc.returncode != 0, proc.output
    assert "Malformed line" in proc.stderr
    assert "not-an-md5" in proc.stderr


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("LICENSE", HTML_PAGE),
        ("tokenizer.model", S3_ERROR),
        ("llama-2-7b/consolidated.00.pth", HTML_PAGE),
        ("llama-2-7b/params.json", b"  <HTML><head><title>Error</title></head></HTML>"),
    ],
)
def test_error_page_instead_of_file(cdn, target, path, body):
    cdn.add_model("7B")
    cdn.error_pages[path] = body

    proc = run_download(cdn, target, "7B")

    assert proc.returncode != 0
    assert EXPIRED_MSG in proc.stderr
    assert path in proc.stderr
    assert not (target / path).exists(), "the error page must not be kept"
    assert fetched(cdn)[-1] == path, "nothing more is downloaded after it"


@pytest.mark.parametrize("path", ["LICENSE", "llama-2-7b/consolidated.00.pth"])
def test_forbidden_means_expired_link(cdn, target, path):
    cdn.add_model("7B")
    cdn.forbidden.add(path)

    proc = run_download(cdn, target, "7B")

    assert proc.returncode != 0
    assert EXPIRED_MSG in proc.stderr
    assert path in proc.stderr
    assert not (target / path).exists()
    assert fetched(cdn)[-1] == path


def test_missing_file_fails(cdn, target):
    cdn.add_model("7B")
    (cdn.root / "llama-2-7b" / "params.json").unlink()

    proc = run_download(cdn, target, "7B")

    assert proc.returncode != 0
    assert "llama-2-7b/params.json" in proc.stderr


@pytest.mark.parametrize("model_size", ["8B", "7B, 8B", "7b"])
def test_unknown_model_is_rejected_before_downloading(cdn, target, model_size):
    cdn.add_model("7B")
    bad = model_size.split(",")[-1].strip()

    proc = run_download(cdn, target, model_size)

    assert proc.returncode != 0
    assert f"'{bad}'" in proc.stderr
    for valid in MODELS:
        assert valid in proc.stderr
    assert fetched(cdn) == []
    assert not target.exists() or not any(target.iterdir())


# --- Llama 3, 3.1, 3.2, 3.3 -------------------------------------------------


def assert_stored(cdn, target, name, version=2):
    """Each file fetched from the model's server folder is in its local folder."""
    remote, local, *_ = spec(name, version)
    names = [p.split("/", 1)[1] for p in fetched(cdn) if p.startswith(remote + "/")]
    assert names, f"nothing fetched from {remote}/"
    for fname in names:
        assert (target / local / fname).read_bytes() == cdn.read(f"{remote}/{fname}")


def test_download_llama3_8b(cdn, target):
    paths = cdn.add_model("8B", version=3)
    cdn.add_model("7B")  # Llama 2's, not asked for

    proc = run_download(cdn, target, "8B", LLAMA_VERSION="3")

    assert proc.returncode == 0, proc.output
    assert fetched(cdn) == ["LICENSE", "USE_POLICY", *paths]
    assert paths == [
        "8b_pre_trained/consolidated.00.pth",
        "8b_pre_trained/params.json",
        "8b_pre_trained/tokenizer.model",
        "8b_pre_trained/checklist.chk",
    ]
    assert_stored(cdn, target, "8B", 3)
    assert (target / "Meta-Llama-3-8B" / "tokenizer.model").is_file()
    assert not (target / "tokenizer.model").exists()
    assert "tokenizer.model: OK" in proc.output


def test_llama3_names_as_meta_spells_them_and_all_by_default(cdn, target):
    for name in LLAMA3_MODELS:
        cdn.add_model(name, version=3)

    proc = run_download(cdn, target, "70b-Instruct, 70B-instruct,8b", LLAMA_VERSION="3")

    assert proc.returncode == 0, proc.output
    got = fetched(cdn)
    assert got.count("70b_instruction_tuned/consolidated.07.pth") == 1
    assert "70b_instruction_tuned/consolidated.08.pth" not in got
    assert "8b_pre_trained/tokenizer.model" in got
    assert not any(p.startswith("70b_pre_trained/") for p in got)
    assert_stored(cdn, target, "70B-instruct", 3)

    cdn.requests.clear()
    proc = run_download(cdn, target, "", LLAMA_VERSION="3")

    assert proc.returncode == 0, proc.output
    for name in LLAMA3_MODELS:
        assert_stored(cdn, target, name, 3)
    assert not any(p.startswith("llama-2-") for p in fetched(cdn))


@pytest.mark.parametrize("name", LLAMA_MODELS_IDS)
def test_download_llama_models_id(cdn, target, name):
    paths = cdn.add_model(name)
    remote, local, shards, _, fp8 = spec(name)

    proc = run_download(cdn, target, name)

    assert proc.returncode == 0, proc.output
    # Only the model's folder, as llama-models' CLI fetches: no LICENSE, no
    # top-level tokenizer.
    assert sorted(fetched(cdn)) == sorted(paths)
    assert f"{remote}/consolidated.{shards - 1:02d}.pth" in paths
    assert f"{remote}/tokenizer.model" in paths
    assert (f"{remote}/fp8_scales_{shards - 1}.pt" in paths) == fp8
    assert_stored(cdn, target, name)
    assert "Done" in proc.stdout


def test_llama_models_ids_mix_with_llama3_names(cdn, target):
    cdn.add_model("8B-instruct", version=3)
    cdn.add_model("Llama3.2-3B-Instruct")

    proc = run_download(cdn, target, "8B-instruct,Llama3.2-3B-Instruct", LLAMA_VERSION="3")

    assert proc.returncode == 0, proc.output
    assert_stored(cdn, target, "8B-instruct", 3)
    assert_stored(cdn, target, "Llama3.2-3B-Instruct")


def test_llama3_2_tokenizer_left_out_of_checklist_fails(cdn, target):
    cdn.add_model("Llama3.2-1B", unlisted=("tokenizer.model",))
    cdn.write("Llama-3.2-1B/tokenizer.model", b"not the tokenizer")

    proc = run_download(cdn, target, "Llama3.2-1B")

    assert proc.returncode != 0, proc.output
    assert "no checksum for: tokenizer.model" in proc.stderr
    assert "Llama3.2-1B/checklist.chk" in proc.stderr


def test_llama3_corrupted_tokenizer_fails(cdn, target):
    cdn.add_model("8B", version=3)
    cdn.write("8b_pre_trained/tokenizer.model", b"not the tokenizer")

    proc = run_download(cdn, target, "8B", LLAMA_VERSION="3")

    assert proc.returncode != 0, proc.output
    assert "Checksum verification failed" in proc.stderr
    assert "tokenizer.model" in proc.stderr


@pytest.mark.parametrize(
    ("version", "name", "hint"),
    [
        ("2", "8B-instruct", "LLAMA_VERSION=3"),
        ("3", "7B-chat", "LLAMA_VERSION=2"),
        ("3", "8b-INSTRUCT", None),
        ("2", "Llama3.1-8b", None),  # IDs are case-sensitive
        ("2", "Llama-3.1-8B", None),  # the server's folder, not an ID
        ("2", "Llama3.2-11B-Vision", None),  # not offered
        ("3", "x:Llama3.1-405B:bf16-mp8", None),
    ],
)
def test_unknown_llama3_name_is_rejected_before_downloading(
    cdn, target, version, name, hint
):
    proc = run_download(cdn, target, f"Llama3.2-1B,{name}", LLAMA_VERSION=version)

    assert proc.returncode != 0
    assert f"'{name}'" in proc.stderr
    assert (hint in proc.stderr) if hint else ("run with LLAMA_VERSION" not in proc.stderr)
    short = MODELS if version == "2" else LLAMA3_MODELS
    for valid in [*short, *LLAMA_MODELS_IDS]:
        assert valid in proc.stderr
    assert fetched(cdn) == []
    assert not target.exists() or not any(target.iterdir())


@pytest.mark.parametrize("version", ["4", "3.1", "llama3"])
def test_bad_llama_version_is_rejected(cdn, target, version):
    proc = run_download(cdn, target, "Llama3.2-1B", LLAMA_VERSION=version)

    assert proc.returncode != 0
    assert "LLAMA_VERSION must be 2" in proc.stderr
    assert f"'{version}'" in proc.stderr
    assert fetched(cdn) == []


def test_url_without_placeholder_is_rejected(cdn, target):
    proc = run_download(cdn, target, "7B", url="http://127.0.0.1:1/LICENSE")

    assert proc.returncode != 0
    assert "'*'" in proc.stderr


def test_no_url_and_no_input_fails(cdn, target):
    proc = run_download(cdn, target, "7B", url="")

    assert proc.returncode != 0
    assert "PRESIGNED_URL" in proc.stderr
    assert fetched(cdn) == []


# --- macOS: no md5sum, only `md5 -r` ------------------------------------------


@pytest.fixture
def macos_path(tmp_path):
    """A PATH like macOS': `uname -s` says Darwin, `md5` exists, md5sum doesn't."""
    bindir = tmp_path / "macbin"
    bindir.mkdir()
    # The commands download.sh uses, besides bash builtins.
    for tool in ["bash", "wget", "head", "tr", "sed", "mkdir", "rm"]:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not installed")
        (bindir / tool).symlink_to(found)
    (bindir / "uname").write_text("#!/bin/sh\necho Darwin\n")
    # `md5 -r FILE` prints '<md5> FILE'.
    (bindir / "md5").write_text(
        f"#!{sys.executable}\n"
        "import hashlib, sys\n"
        "assert sys.argv[1] == '-r', sys.argv\n"
        "for f in sys.argv[2:]:\n"
        "    print(hashlib.md5(open(f, 'rb').read()).hexdigest(), f)\n"
    )
    for fake in ["uname", "md5"]:
        (bindir / fake).chmod(0o755)
    return str(bindir)


def test_macos_verifies_with_md5(cdn, target, macos_path):
    paths = cdn.add_model("7B")

    proc = run_download(cdn, target, "7B", path=macos_path)

    assert proc.returncode == 0, proc.output
    assert "consolidated.00.pth: OK" in proc.output
    assert_same_files(cdn, target, TOP_LEVEL + paths)


def test_macos_detects_corruption(cdn, target, macos_path):
    cdn.add_model("7B")
    cdn.write("llama-2-7b/consolidated.00.pth", b"PK\x03\x04 corrupted")

    proc = run_download(cdn, target, "7B", path=macos_path)

    assert proc.returncode != 0
    assert "checksum" in proc.stderr.lower()
    assert "consolidated.00.pth" in proc.stderr
