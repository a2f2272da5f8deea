"""Reading and writing Meta-layout checkpoints: ``params.json`` plus ``consolidated.NN.pth`` shards.

Each shard holds one model-parallel rank's slice of every weight. The slice is taken along one dimension per
weight, which the layer holding it declares (``llama.weights.layout`` reads it), so any checkpoint can be re-cut for
any number of ranks the heads allow. Shards are opened memory-mapped: a weight is read from disk only when a slice of
it is used. This module reads and writes files; the layout decides what goes where. Quantized folders are
``llama.weights.quantized``'s, which builds on this module (never the reverse).

Loading refuses, naming the file and the key, weights that are not bfloat16, float16 or float32 (integers, or the
float8 of an FP8 release), weights that hold inf or NaN, and shards that are copies of each other.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TextIO

import torch

from llama.model import ModelArgs, Transformer, ffn_hidden_dim
from llama.weights.layout import Layout, check_model_parallel_fit, layer_count

logger = logging.getLogger(__name__)

# Keys of Meta's checkpoints that carry no parameter of ours (the 7B shards hold precomputed RoPE frequencies).
IGNORED_KEYS = frozenset({"rope.freqs"})

SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")

# The params.json key of a checkpoint written by ``python -m llama.quantize``: its presence is all this module knows
# of quantized folders (``llama.weights.quantized`` reads them, and says how they were made).
QUANTIZATION_KEY = "quantization"


def is_quantized(params: Mapping[str, Any]) -> bool:
    """Whether a folder's params.json (as ``read_params`` gives it: a null key is dropped) says it is quantized."""
    return QUANTIZATION_KEY in params

# The float dtypes a weight may have: Meta publishes bfloat16; conversions and our tools may write float16 or float32.
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

FP8_UNSUPPORTED = (
    "FP8 checkpoints are not supported (their weights need the scales of fp8_scales_*.pt, and upcast without them "
    "they give another model): download the model's bf16 release instead, the same model without -FP8 in its name "
    "(e.g. Llama-3.1-405B-Instruct rather than Llama-3.1-405B-Instruct-FP8)"
)


def read_params(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The contents of ckpt_dir/params.json, with errors that name the file. ``"quantization": null`` is read as
    absent: the checkpoint is not quantized."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {str(ckpt_dir)!r}")
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found: a Meta checkpoint folder holds params.json next to its shards"
        )
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(params).__name__}")
    if QUANTIZATION_KEY in params and params[QUANTIZATION_KEY] is None:
        del params[QUANTIZATION_KEY]  # "quantization": null says "not quantized": read it as if it were absent
    return params


def find_shards(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The shard files consolidated.00.pth, consolidated.01.pth, ... of ckpt_dir, in rank order."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {str(ckpt_dir)!r}")
    fp8_scales = sorted(ckpt_dir.glob("fp8_scales_*.pt"))
    if fp8_scales:  # Meta's FP8 releases (Llama-3.1-405B-FP8): float8 weights in the shards, their scales here
        raise ValueError(f"{str(ckpt_dir)!r} is an FP8 checkpoint (it holds {fp8_scales[0].name}): {FP8_UNSUPPORTED}")
    found = {}
    for path in ckpt_dir.glob("consolidated.*.pth"):
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            index = int(match.group(1))
            if index in found:  # consolidated.0.pth and consolidated.00.pth: which one is meant cannot be told
                first, second = sorted([found[index].name, path.name])
                raise ValueError(
                    f"checkpoint {str(ckpt_dir)!r} is ambiguous: both {first} and {second} hold shard {index}; "
                    "remove one of them"
                )
            found[index] = path
    if not found:
        raise FileNotFoundError(f"no checkpoint shards (consolidated.NN.pth) in {str(ckpt_dir)!r}")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        raise FileNotFoundError(f"checkpoint {str(ckpt_dir)!r} is incomplete: missing {names}")
    return [found[i] for i in sorted(found)]


def load_shard(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Open one shard lazily (memory-mapped) and safely (tensors only, nothing in the file is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard not found: {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors, which could run code ({e})"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint shard {str(path)!r} (corrupt or truncated?): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} must hold a dict of tensors, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{str(path)!r}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if key not in IGNORED_KEYS:
            check_weight_dtype(path, key, value)
    return state


def check_weight_dtype(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Raise a ValueError naming the file, the key and the dtype unless `tensor` is a float weight of one of
    WEIGHT_DTYPES. Any other would be cast to the model's dtype without a word: integer, bool or complex weights
    give garbage, and float8 ones (an FP8 release) lose the scales they were stored with."""
    if tensor.dtype in WEIGHT_DTYPES:
        return
    where = f"{str(path)!r}: {key!r} holds {tensor.dtype} values"
    if tensor.is_floating_point() and tensor.element_size() == 1:  # float8_e4m3fn, float8_e5m2, ...
        raise ValueError(f"{where}: {FP8_UNSUPPORTED}")
    if tensor.is_floating_point():
        raise ValueError(f"{where}; weights must be bfloat16, float16 or float32: convert them to one of those")
    raise ValueError(
        f"{where}; weights must be floating point (bfloat16, float16 or float32), or params.json must say how they "
        f"were quantized ({QUANTIZATION_KEY!r}, written by python -m llama.quantize)"
    )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds no inf or NaN. Its smallest and largest values tell (NaN propagates to both),
    in one pass that allocates nothing: 15 times faster than torch.isfinite(t).all() on a CPU, and about the cost
    of reading the tensor once (which loading does anyway)."""
    return tensor.numel() == 0 or all(bool(torch.isfinite(x)) for x in torch.aminmax(tensor))


def check_finite(
    key: str, tensor: torch.Tensor, paths: Sequence[Path], shards: Sequence[Mapping[str, torch.Tensor]]
) -> None:
    """Raise a ValueError naming the shard files and the key if weight `key` holds inf or NaN, in `tensor` (a
    rank's slice of it, as loaded from `shards`, the files `paths`). A damaged file would otherwise load without
    a word and generate garbage with NaN log-probabilities."""
    if is_finite(tensor):
        return
    bad = [str(p) for p, s in zip(paths, shards) if key in s and not is_finite(s[key])]
    if not bad:  # finite in the files: the conversion to the model's dtype overflowed
        raise ValueError(
            f"{key!r} of {str(paths[0].parent)!r} holds values beyond the range of {tensor.dtype}; load it with "
            "dtype=torch.bfloat16 or torch.float32"
        )
    raise ValueError(
        f"{', '.join(map(repr, bad))}: {key!r} holds inf or NaN values; the file is damaged: re-download it "
        "(or re-create it from a good copy)"
    )


class StandInShard(dict):
    """A shard as meta tensors of the weights it stands for, where its file stores some weights in another form (a
    quantized checkpoint's P.qweight and P.scales for the float P.weight: ``quantized.float_shaped_shards``), so
    that its shapes are checked as any checkpoint's. `stored_as(key)` names what the file holds for weight `key`,
    so that errors name keys that are in the files."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], stored_as: Callable[[str], str]):
        super().__init__(tensors)
        self.stored_as = stored_as


def _stored_as(shards: Sequence[Mapping[str, torch.Tensor]]) -> Callable[[str], str]:
    """What the files of `shards` hold for a weight, by its key: the key itself, except for stand-ins."""
    return shards[0].stored_as if isinstance(shards[0], StandInShard) else str


def check_state_dict(
    shapes: Mapping[str, Sequence[int]],
    expected: Mapping[str, Sequence[int]],
    source: str,
    stored_as: Callable[[str], str] = str,
) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped key.

    shapes: key -> shape of what the checkpoint holds; expected: key -> shape the model needs. stored_as: the
    name in the files of a key (``StandInShard``), for the messages.
    """
    keys = set(shapes) - IGNORED_KEYS
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(map(stored_as, missing))}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(map(stored_as, unexpected))}")
    wrong = [
        f"{stored_as(k)}: checkpoint {tuple(shapes[k])} vs model {tuple(expected[k])}"
        + (" (as the float weight they stand for)" if stored_as(k) != k else "")
        for k in sorted(keys & set(expected))
        if tuple(shapes[k]) != tuple(expected[k])
    ]
    if wrong:
        problems.append("shape mismatches (does params.json match the weights?): " + "; ".join(wrong))
    if problems:
        raise ValueError(f"checkpoint {source} does not fit the model: " + " | ".join(problems))


@dataclass
class Checkpoint:
    """An opened, checked checkpoint folder. Shards are memory-mapped; nothing is read until sliced."""

    folder: Path
    params: dict[str, Any]  # params.json as written
    args: ModelArgs  # from params.json, with vocab_size taken from the weights
    paths: list[Path]
    shards: list[dict[str, torch.Tensor]]
    layout: Layout  # the generation's own layout of args: what loading and resharding cut the weights into
    written: Layout  # split dims as the shards were cut (another tool may split the embedding the other way)
    model_cls: type  # the generation's model class, whose layout this is

    @property
    def keys(self) -> list[str]:
        """Every key of the shards, in file order (including ignored ones such as rope.freqs)."""
        return list(self.shards[0])

    def remap(self) -> list[dict[str, torch.Tensor]]:
        """The shards mapped afresh. Pages read through a mapping count in this process's memory until the
        mapping goes, so a tool that reads the checkpoint piece by piece takes fresh mappings for each piece."""
        return [load_shard(p) for p in self.paths]

    def slice_for_rank(
        self, shards: Sequence[Mapping[str, torch.Tensor]], key: str, rank: int, world_size: int
    ) -> torch.Tensor:
        """Rank `rank`'s slice (of `world_size`) of weight `key` in `layout`, from shards of this checkpoint."""
        return self.layout.slice_from(self.written, shards, key, rank, world_size)

    def check_split(self, n_shards: int) -> None:
        """Raise a ValueError naming the usable sizes unless the weights can be cut into n_shards shards."""
        check_model_parallel_fit(self.args, n_shards, model_cls=self.model_cls)


def open_checkpoint(ckpt_dir: str | os.PathLike, model_cls: type = Transformer) -> Checkpoint:
    """Open a Meta checkpoint folder and check that its shards fit together and fit params.json.

    params.json holds vocab_size -1 (the tokenizer decides), so the vocabulary size is read from the weights.
    """
    folder = Path(ckpt_dir)
    params = read_params(folder)
    paths = find_shards(folder)
    shards = [load_shard(p) for p in paths]
    args, layout = fit_params_to_shards(params, paths, shards, None, model_cls)
    return Checkpoint(folder, params, args, paths, shards, layout, Layout.for_shards(shards, model_cls), model_cls)


def fit_params_to_shards(
    params: Mapping[str, Any],
    paths: Sequence[Path],
    shards: Sequence[Mapping[str, torch.Tensor]],
    tokenizer_vocab: Optional[int],
    model_cls: type = Transformer,
) -> tuple[ModelArgs, Layout]:
    """The ModelArgs and Layout of params.json, once checked against the (memory-mapped) shards' shapes.

    Only shapes are compared and nothing of the model's size is allocated before the sizes that drive memory
    (n_layers, dim, the FFN size) are known to match the weights, so a params.json with dim 10**9 is refused at
    once. tokenizer_vocab: the tokenizer's size, which must equal the weights' (None: take the weights').
    """
    folder = paths[0].parent
    source = repr(str(folder / "params.json"))
    stored_as = _stored_as(shards)
    pre = Layout.for_shards(shards, model_cls)  # split dims only, as the shards were written
    pre.check_shards_agree(paths, shards)
    shapes = pre.merged_shapes(shards)
    output = stored_as("output.weight")
    if "output.weight" not in shapes:
        raise ValueError(f"checkpoint {str(folder)!r} does not fit the model: missing keys: {output}")
    vocab_size = shapes["output.weight"][0]
    if params.get("vocab_size", -1) not in (-1, vocab_size):
        raise ValueError(f"{source} says vocab_size={params['vocab_size']}, but {output} has {vocab_size} rows")
    if tokenizer_vocab is not None and tokenizer_vocab != vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab} tokens but the checkpoint's {output} has {vocab_size} rows: "
            "is it the tokenizer of this model?"
        )
    try:
        args = ModelArgs.from_params({**params, "vocab_size": vocab_size})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source} is not a valid model configuration: {e}") from e
    sizes = [("n_layers", args.n_layers, layer_count(shapes), "layers in its shards")]
    if "norm.weight" in shapes:
        sizes.append(("dim", args.dim, shapes["norm.weight"][0], "in norm.weight"))
    if "layers.0.feed_forward.w1.weight" in shapes:
        hidden = ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier)
        sizes.append(("the FFN size", hidden, shapes["layers.0.feed_forward.w1.weight"][0], "rows in layers.0's w1"))
    for name, implied, found, where in sizes:
        if implied > found:  # smaller sizes allocate nothing dangerous: check_state_dict names every key below
            raise ValueError(
                f"checkpoint {str(folder)!r} does not fit the model: shape mismatches (does params.json match the "
                f"weights?): {source} gives {name} = {implied}, but the checkpoint has {found} {where}"
            )
    layout = Layout.for_args(args, model_cls)
    check_state_dict(shapes, layout.shapes, repr(str(folder)), stored_as)
    return args, layout


def release_parameters(model: torch.nn.Module) -> None:
    """Swap every parameter of `model` for a data-less meta tensor of the same shape and dtype.

    The model's constructor allocated (and with fairscale under model parallelism, also wrote) weights that the
    checkpoint is about to replace; freeing them first keeps peak memory at one copy of the weights.
    """
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad))


def load_weights(
    model: torch.nn.Module,
    shard_paths: Sequence[Path],
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Assign rank `rank`'s slice of the checkpoint's weights to `model`, checking every key and shape, and that
    no weight holds inf or NaN (``check_finite``).

    Shards are memory-mapped, and the model's own weights are released before any slice is made, so host memory
    stays at one copy of this rank's weights. Tensors are copied only where their dtype or device differs, or
    where a slice spans shards; otherwise the model's weights are the memory-mapped file itself (which the check
    for inf and NaN reads once, from disk or the page cache).
    """
    shards = [load_shard(p) for p in shard_paths]
    source = repr(str(shard_paths[0].parent))
    layout = Layout.from_model(model, world_size)
    written = Layout.for_shards(shards, type(model))  # how the shards were cut (the embedding may differ)
    written.check_shards_agree(shard_paths, shards)
    check_state_dict(written.merged_shapes(shards), layout.shapes, source)
    release_parameters(model)

    state = {}
    for key in shards[0]:
        if key not in IGNORED_KEYS:
            state[key] = layout.slice_from(written, shards, key, rank, world_size).to(device=device, dtype=dtype)
            state[key] = state[key].contiguous()
            check_finite(key, state[key], shard_paths, shards)  # on the device: there it costs little
    model.load_state_dict(state, strict=True, assign=True)


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself if it owns exactly its storage, else a contiguous copy.

    torch.save writes a tensor's whole storage, so saving a slice (a view) of a larger tensor as is would write
    the larger tensor.
    """
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if whole and tensor.is_contiguous() and tensor.storage_offset() == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def check_out_dir(out_dir: str | os.PathLike, src_dir: str | os.PathLike) -> None:
    """Raise a ValueError when out_dir is src_dir or inside it (links followed).

    A new folder inside a checkpoint could take a shard's name (consolidated.01.pth) or be read as part of it.
    """
    out, src = Path(out_dir), Path(src_dir)
    if src.resolve() in (out.resolve(), *out.resolve().parents):
        raise ValueError(
            f"output folder {str(out)!r} is the source folder {str(src)!r} or inside it; write it somewhere else"
        )


# Inside a temporary output folder while it is written: which process writes it, so that a later run can tell
# a folder left by a killed writer (removed) from one a live writer is still filling (left alone).
WRITER_MARKER = ".llama-writer.json"

# After a failed write, less free space than this means the disk was full (torch.save does not say so itself).
_FULL_DISK_BYTES = 64 * 2**20


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> Optional[int]:
    """When process pid started, in clock ticks after boot (field 22 of /proc/PID/stat); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # the name, in parentheses, may hold spaces


def _writer_marker() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "start_time": _start_time(pid)}


def _writer_is_gone(marker: Mapping[str, Any]) -> bool:
    """True only when the process that wrote `marker` has surely stopped; a PID reused since does not count."""
    pid = marker.get("pid")
    if marker.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
        return False  # another machine's writer (a shared file system), or no marker of ours: cannot tell
    if marker.get("boot_id") != _boot_id():
        return True  # written before the machine last started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = marker.get("start_time")
    return started is not None and _start_time(pid) not in (None, started)


def _remove_abandoned_outputs(folder: Path) -> None:
    """Remove the temporary output folders in `folder` whose writers were killed (SIGKILL cannot be caught)."""
    for tmp in folder.glob(".*.tmp-*"):
        try:
            marker = json.loads((tmp / WRITER_MARKER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or its writer has not written the marker yet
        if isinstance(marker, dict) and _writer_is_gone(marker):
            shutil.rmtree(tmp, ignore_errors=True)
            done = "could not remove" if tmp.exists() else "removed"
            logger.warning("%s %s, left by an interrupted writer (pid %s) no longer running", done, tmp, marker["pid"])


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether a write failed for want of disk space. torch.save reports a full disk as a bare RuntimeError
    ("file write failed", "basic_ios::clear: iostream error"), so for write errors the free space decides."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
        return True
    if not isinstance(error, (OSError, RuntimeError)) or isinstance(error, FileExistsError):
        return False
    try:
        return shutil.disk_usage(folder).free < _FULL_DISK_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM (``kill``, ``timeout``) raises SystemExit(143) instead of killing the process
    on the spot, so that cleanup code runs. Only in the main thread (where Python runs signal handlers), and only
    where SIGTERM has its default action: a program's own handler, or an ignored signal, is left as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to out_dir; rename it to out_dir when the block succeeds.

    If the block raises or is interrupted (Ctrl-C, SIGTERM), the temporary folder is removed, so no half-written
    output is left. A writer killed outright (SIGKILL, power loss) cannot clean up; the next call removes its
    folder once that writer is no longer running, and logs what it removed. A full disk raises an OSError (errno
    ENOSPC) that says so. out_dir must not exist yet.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{str(out_dir)!r} already exists; choose a new output folder or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_outputs(out_dir.parent)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    with _sigterm_raises():
        tmp.mkdir()  # unlike tempfile.mkdtemp, honours the umask, so the final folder gets the usual permissions
        try:
            (tmp / WRITER_MARKER).write_text(json.dumps(_writer_marker()))
            yield tmp
            if out_dir.exists():
                raise FileExistsError(f"{str(out_dir)!r} appeared while it was being written; remove it and retry")
            (tmp / WRITER_MARKER).unlink()
            tmp.rename(out_dir)
        except BaseException as e:
            full = _out_of_space(e, out_dir.parent)  # before the removal frees the space again
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise OSError(
                    errno.ENOSPC,
                    f"no space left on {str(out_dir.parent)!r} while writing {str(out_dir)!r} ({e}); free some "
                    "space or choose another output folder (nothing was left behind)",
                ) from e
            raise


class ProgressLine:
    """A one-line text progress bar on stderr, e.g. ``reshard [######......] 2/4 consolidated.01.pth``.

    Called once per finished item. On a terminal the line is redrawn in place; elsewhere (a log file) each
    update is a line of its own.
    """

    def __init__(self, label: str, total: int, stream: Optional[TextIO] = None, width: int = 24):
        self.label, self.total, self.width, self.done = label, total, width, 0
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, item: str | Path) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {Path(item).name}"
        if self.stream.isatty():
            end = "\n" if self.done == self.total else ""
            self.stream.write(f"\r{line}\x1b[K{end}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def save_checkpoint(
    out_dir: str | os.PathLike,
    shards: Iterable[Mapping[str, torch.Tensor]],
    params: Mapping[str, Any] | str | os.PathLike,
    extra_files: Iterable[str | os.PathLike] = (),
    on_shard_saved: Optional[Callable[[Path], None]] = None,
    extra_contents: Optional[Mapping[str, bytes]] = None,
) -> Path:
    """Write shards and params.json as a Meta checkpoint folder.

    `shards` may be a generator: each shard is saved, and released, before the next one is asked for, so memory
    holds one shard at a time. `params` is the params.json content, or a params.json file to copy as is.
    `extra_files` are copied into the folder; `extra_contents` (file name -> bytes) are written into it, so that
    made-up files need no temporary copy elsewhere that a killed run would leave behind.
    Everything goes to a temporary folder next to out_dir that is renamed at the end, so an interrupted write
    leaves no half checkpoint behind. out_dir must not exist yet.
    """
    with atomic_output_dir(out_dir) as tmp:
        for rank, shard in enumerate(shards):
            path = tmp / f"consolidated.{rank:02d}.pth"
            torch.save({k: compact(v) for k, v in shard.items()}, path)
            del shard  # or it would stay alive while a generator builds the next one
            if on_shard_saved is not None:
                on_shard_saved(path)
        if isinstance(params, Mapping):
            (tmp / "params.json").write_text(json.dumps(dict(params), indent=2) + "\n")
        else:
            shutil.copyfile(params, tmp / "params.json")
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        for name, contents in (extra_contents or {}).items():
            (tmp / name).write_bytes(contents)
    return Path(out_dir)
