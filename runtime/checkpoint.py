"""A run's files: checkpoints (plain tensors and dicts, written atomically, read with
weights_only=True), the JSON-lines log, the lock that keeps two runs out of one folder, and the
rule for which options a resumed run may change.

train.py's checkpoint.pth holds {"model", "optimizer", "scaler", "epoch", "step_in_epoch",
"world_size", "runtime", "train_images", "knn_random_init", "args"}; eval_linear.py's its own
classifier state. Anything
that is not such a file, is truncated, or describes another model fails with one ConfigError
line naming what was expected.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile

import torch


class ConfigError(Exception):
    """Bad options, an unusable checkpoint or a run folder that cannot be written; the message
    names the value and what is allowed."""


def state_bytes(state) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about the size of its file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def size_text(n: int) -> str:
    """A byte count for a message: MiB from 1 MiB on, KiB from 1 KiB on, else bytes."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}"
    return f"{n} bytes"


def is_full_disk(error: BaseException) -> bool:
    """Whether a failed write ran out of room (ENOSPC, or EDQUOT: the user's quota). torch.save
    reports it as its own "[enforce fail at inline_container.cc...] unexpected pos" RuntimeError,
    raised while the file's OSError is being handled: so the whole chain is looked at."""
    while error is not None:
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_error(path: str, error: BaseException, need: int, advice: str, replacing: bool = False) -> ConfigError:
    """The one line for a write to path that failed. A full disk says how much room the write
    needs (replacing: beside the previous file, which stays until the new one is complete) and
    advice, what to do then."""
    if not is_full_disk(error):
        return ConfigError(f"cannot write {path}: {' '.join(str(error).split())}")
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    beside = f" beside the previous {name}" if replacing and os.path.exists(path) else ""
    return ConfigError(f"no space left on {folder}: saving {name} needs about {size_text(need)} free{beside}, "
                       f"{size_text(shutil.disk_usage(folder).free)} are; {advice}")


def write_atomically(path: str, write, need: int, advice: str) -> None:
    """write(file) into PATH.tmp, flushed to the disk, then renamed to PATH: a crash or a full
    disk never leaves a truncated PATH behind. A failure removes PATH.tmp and raises one
    ConfigError line (write_error). need: about the bytes written, for the full-disk message."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise write_error(path, e, need, advice, replacing=True) from None


def save_checkpoint(path: str, state: dict, advice: str = "free some space and rerun to resume") -> None:
    """Plain tensors and dicts (loadable with weights_only=True), written atomically
    (write_atomically).

    torch.save is given an open file rather than a name: its own writer reports a full disk as
    "inline_container ... unexpected pos" without the cause, while Python's file raises ENOSPC,
    which is_full_disk finds. advice: what a full disk's message tells to do (an export has
    nothing to resume).
    """
    write_atomically(path, lambda f: torch.save(state, f), state_bytes(state), advice)


def write_json(path: str, obj, advice: str = "free some space and rerun") -> None:
    """obj as indented JSON, written atomically (write_atomically): a full disk leaves the
    previous file, or none, never an empty or cut one; one ConfigError line instead."""
    text = (json.dumps(obj, indent=2) + "\n").encode()
    write_atomically(path, lambda f: f.write(text), len(text), advice)


LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950a86a20f9469cfc6c).to_bytes(10, "little")  # torch.save before 1.6


def is_torch_file(path: str) -> bool:
    """Whether path is in one of torch.save's formats: a zip archive, or the older format that
    begins with a pickled magic number. Random bytes can read as pickle opcodes that the safe
    loader refuses ("Unsupported operand"): they are still not a checkpoint."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC


def load_checkpoint(path: str, expect: dict = None, required=("model", "optimizer", "epoch", "args")) -> dict:
    """Read a checkpoint with weights_only=True; ConfigError with one clear line if it is unusable.

    expect maps args entries to the values the caller needs (e.g. {"arch": "resnet50"}).
    """
    if os.path.isdir(path):
        raise ConfigError(f"checkpoint {path} is a directory; give the checkpoint file (e.g. {path}/checkpoint.pth)")
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles: the error line says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle of arbitrary objects
        # torch's message advises weights_only=False: unsafe, and never right for this project's
        # files. Its words vary between releases ("Unsupported global", "unsupported GLOBAL").
        text = str(e).lower()
        unsafe = is_torch_file(path) and ("unsupported global" in text or "unsupported operand" in text)
        reason = "it holds objects other than tensors and dicts, and was not loaded (nothing in it ran)" \
            if unsafe else "it is not a torch checkpoint file, or it is truncated"
        raise ConfigError(f"cannot read checkpoint {path}: {reason}; give a checkpoint.pth written by "
                          f"train.py") from None
    if not isinstance(ckpt, dict) or not set(required) <= set(ckpt):
        raise ConfigError(f"{path} is not a checkpoint of this project (expected keys {', '.join(required)})")
    for key, want in (expect or {}).items():
        if ckpt["args"].get(key) != want:
            raise ConfigError(f"checkpoint {path} has {key}={ckpt['args'].get(key)!r} but "
                              f"{key}={want!r} was asked for")
    return ckpt


def checkpoint_data_path(ckpt_path: str, pre: dict, data_path=None, dataset=None) -> str:
    """The data set's root: data_path if given, else the checkpoint's. train.py stores it
    absolute; a relative one (older train.py) is taken relative to the parent of the
    checkpoint's folder, where `train.py --output-dir OUT` was run for OUT/checkpoint.pth."""
    if data_path:
        return data_path
    stored = pre.get("data_path") or "data"
    if os.path.isabs(stored) or (dataset or pre["dataset"]) == "fake":  # fake data needs no folder
        return stored
    resolved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))), stored)
    if not os.path.exists(resolved):
        raise ConfigError(f"{ckpt_path} stores the relative data path {stored!r} (an older train.py) and "
                          f"{resolved} does not exist; give --data-path")
    return resolved


def weights_digest(state: dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values: the identity of a set of
    weights, whichever file holds them (eval_linear.py resumes only on the same backbone)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_state(module, state: dict, what: str) -> None:
    """Strict load_state_dict whose failure is a one-line ConfigError naming what does not fit
    (torch's first line says only that something failed; the next ones name the keys)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = "; ".join(lines[1:]) or lines[0] if lines else type(e).__name__
        raise ConfigError(f"{what} does not fit: {detail[:400]}") from None


# Options a resumed run may change freely: they only affect output, monitoring, speed, where
# the same data set is read from, or when this launch stops. Any other difference from the
# checkpoint's options is refused unless --allow-changed-args is given.
FREE_ON_RESUME = ("output_dir", "resume", "data_path", "workers", "print_freq", "compile", "knn_every", "knn_k",
                  "knn_t", "knn_train_size", "knn_test_size", "epochs", "stop_after_epoch", "allow_changed_args",
                  "strict_data", "compile_mode", "monitor_path")


def changed_args(saved: dict, current: dict, free=FREE_ON_RESUME) -> list[str]:
    """'name: saved -> current' for every option (outside free) that differs."""
    missing = "(absent)"
    return [f"{k}: {saved.get(k, missing)!r} -> {current.get(k, missing)!r}"
            for k in sorted(set(saved) | set(current))
            if k not in free and saved.get(k, missing) != current.get(k, missing)]


def check_resume(ckpt: dict, path: str, args: dict, runtime: dict, allow: bool, free=FREE_ON_RESUME) -> list[str]:
    """Refuse (ConfigError) a resume that would silently change the run; return the accepted
    differences (allow=True) so the caller can print and log them.

    runtime: the world size and what the run resolved on its machine (device type, augmentation
    path; older checkpoints hold only the world size), compared like the options. A mid-epoch resume
    with another global batch or world size is refused even with allow: it would skip the
    wrong samples of the interrupted epoch. free: the options that may change (eval_linear.py
    has its own list: there --epochs sets the lr schedule).
    """
    saved = {"world_size": ckpt.get("world_size", runtime["world_size"]), **ckpt.get("runtime", {})}
    if ckpt.get("step_in_epoch", 0) and (ckpt["args"].get("batch_size") != args["batch_size"]
                                          or saved["world_size"] != runtime["world_size"]):
        raise ConfigError(f"{path} stopped inside epoch {ckpt['epoch'] + 1} with --batch-size "
                          f"{ckpt['args'].get('batch_size')} on {saved['world_size']} processes; a mid-epoch "
                          f"resume needs the same batch size and number of processes (got {args['batch_size']} "
                          f"on {runtime['world_size']})")
    diff = changed_args(ckpt["args"], args, free) + changed_args(saved, {k: runtime[k] for k in saved}, free)
    if diff and not allow:
        raise ConfigError(f"{path} was written with other options: {'; '.join(diff)}. Rerun with the "
                          f"checkpoint's options, another --output-dir, or --allow-changed-args")
    return diff


class RunLock:
    """An exclusive lock on OUTPUT/.lock held for the life of a run, so a second run on the same
    folder is refused instead of interleaving log.txt and checkpoint.pth.tmp. It is an flock:
    the operating system releases it when the process ends, even after a crash or kill -9.
    The file holds the owner's pid and what it runs (`what`: training, evaluation), for the
    message of the run that is refused."""

    def __init__(self, folder: str, what: str = "training"):
        self.path = os.path.join(folder, ".lock")
        created = not os.path.lexists(self.path)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid, _, owner = self.file.read().strip().partition(" ")
            self.file.close()
            raise ConfigError(f"{folder} is in use by a running {owner or 'training'} (pid {pid or 'unknown'}); "
                              f"wait for it, stop it, or choose another --output-dir") from None
        owner = f"{os.getpid()} {what}".encode()
        try:  # unbuffered: nothing is left to fail again when the file is closed
            os.ftruncate(self.file.fileno(), 0)
            os.write(self.file.fileno(), owner)
        except OSError as e:  # a full disk: the lock is not needed to report it, nor left behind
            if created:
                os.remove(self.path)
            self.release()
            raise write_error(self.path, e, len(owner), "free some space and rerun") from None

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def check_output_dir(folder: str) -> None:
    """ConfigError if the run folder is a file or an existing folder that cannot be written."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"--output-dir {folder} is a file, not a folder; choose another --output-dir")
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {folder} is not writable; choose another --output-dir")


def check_writable_folder(folder: str, option: str) -> None:
    """ConfigError unless folder is, or can be created as, a folder that takes files. Tried for
    real, since some file systems (/proc) refuse what their permissions promise, and left as it
    was: the folders made for the try are removed again (a benchmark checks its --out before
    its minutes of work, and writes only at the end)."""
    made, at = [], os.path.abspath(folder)
    while not os.path.lexists(at):  # innermost first
        made.append(at)
        at = os.path.dirname(at)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(f"{option} {folder} cannot be written ({e.strerror}); choose another {option}") from None
    finally:
        for path in made:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def prepare_output_dir(folder: str) -> None:
    """Create the run folder; ConfigError if it is a file or cannot be written."""
    check_output_dir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --output-dir {folder}: {e.strerror}") from None
    check_output_dir(folder)


def append_json(path: str, entry: dict, advice: str = "free some space and rerun") -> None:
    """entry as one JSON line at the end of path, on a line of its own even after a line that
    an earlier process left cut short (killed mid-write). A failed write (a full disk) cuts the
    file back to its previous end, so no half line is left, and raises one ConfigError line."""
    line, existed = (json.dumps(entry) + "\n").encode(), os.path.lexists(path)
    try:
        with open(path, "a+b", buffering=0) as f:  # unbuffered: nothing is retried when it is closed
            end = f.seek(0, os.SEEK_END)
            if end and os.pread(f.fileno(), 1, end - 1) != b"\n":  # a cut line: start a new one
                line = b"\n" + line
            try:
                written = 0
                while written < len(line):  # a raw write may take part of the line, then fail
                    written += f.write(line[written:])
            except OSError:
                os.ftruncate(f.fileno(), end)
                raise
    except OSError as e:
        if not existed and os.path.isfile(path):  # no empty file left behind either
            os.remove(path)
        raise write_error(path, e, len(line), advice) from None


def claim_output_dir(folder: str, what: str) -> "RunLock":
    """Create the run folder and hold its run lock: a second run (of `what`: training,
    evaluation) into it is refused with one line instead of mixing the files of both."""
    prepare_output_dir(folder)
    return RunLock(folder, what)


def log_changes(log_path: str, epoch: int, changes: list) -> None:
    """The option changes a resume accepted (--allow-changed-args), printed and logged with the
    first epoch they apply to."""
    for change in changes:
        print(f"resumed with a changed option (--allow-changed-args): {change}")
    if changes:
        append_json(log_path, {"epoch": epoch, "changed_args": changes})


def new_log(path: str, entry: dict) -> None:
    """Start a new run's log with its first entry: a log left by an attempt that ended before
    its first checkpoint (it holds only such an entry) is replaced, not continued."""
    if os.path.isfile(path):
        os.remove(path)
    append_json(path, entry)


class Log(list):
    """read_log's entries; `broken` counts the lines it skipped."""
    broken = 0


def log_entry(line: str):
    """A log.txt line as its JSON object with an integer "epoch", else None (a cut line)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and type(entry.get("epoch")) is int else None


def read_log(path: str) -> Log:
    """log.txt's JSON lines merged per epoch, in epoch order: each epoch's line is followed by
    one with its kNN figure (knn_top1, or knn_interrupted) once the monitor has run, a resumed
    run may add a line for an epoch (its changed options) or repeat one (after a failed save:
    the later wins). A line that is not such an object (a write cut short by a kill or a full
    disk) is skipped and counted in .broken; a file of nothing else is a ValueError."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    entries = [e for e in map(log_entry, lines) if e is not None]
    if lines and not entries:
        raise ValueError(f"{path} holds no train.py log entry")
    merged = {}
    for e in entries:
        merged.setdefault(e["epoch"], {}).update(e)
    log = Log(merged[epoch] for epoch in sorted(merged))
    log.broken = len(lines) - len(entries)
    return log
