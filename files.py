"""
Reading and writing files safely, for every stage: text read line by line with errors that name the file and
the line, and writes that a reader (or a crash) never sees half done.

    from files import atomic_write, read_lines
    atomic_write("out/eval.json", b"{}")          # a temporary file, then a rename (atomic_path: by name)
    for lineno, line in read_lines("data.jsonl"):  # UTF-8 (gzipped if .gz), \\n endings, no byte-order mark
        ...
"""
import contextlib
import errno
import gzip
import hashlib
import os
import re
import shutil
import tempfile
import zlib


class DataError(ValueError):
    """A problem with a file the user gave (missing, not UTF-8, malformed): one line that says what to fix."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or of another model, tokenizer or base: one line that names the
    file and says what to do."""


class WriteError(OSError):
    """A file that could not be written -- a full disk, a quota, a file-size limit --: one line that names
    it, the space left on its disk, and what was kept."""


# --- reading ---------------------------------------------------------------------------------------------

def read_lines(path: str):
    """(line number, text) of each line of a UTF-8 text file (gzipped if it ends in .gz), with \\n endings and
    without a leading byte-order mark. A byte that is not UTF-8 is a DataError naming the file, the line and
    the byte offset."""
    opener = gzip.open if path.endswith(".gz") else open
    offset = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    where = "uncompressed byte" if path.endswith(".gz") else "byte"
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at {where} "
                                    f"{offset + e.start:,}); convert the file to UTF-8 first") from None
                offset += len(raw)
                if lineno == 1:
                    line = line.lstrip("\ufeff")  # a byte order mark is not text
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"
                yield lineno, line
    except (gzip.BadGzipFile, EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"no such file: {path}") from None
        raise DataError(f"cannot read {path}: {e}") from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- writing ---------------------------------------------------------------------------------------------

def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024


@contextlib.contextmanager
def writing(path: str, kept: str):
    """Around the writes of path (a file or a directory): an error raised by them becomes one WriteError that
    names path, the reason, the space left on its disk, and `kept` -- what is still there and what to do.
    The libraries say a full disk each their own way: OSError (numpy, open files), a RuntimeError "unexpected
    pos" (torch.save), SafetensorError (a RuntimeError-like Exception); a KeyboardInterrupt passes through.

        with writing("out/run/last", "the previous checkpoint is kept: free some space, then resume"):
            save(...)
    """
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        said = re.search(r"os error (\d+)", str(e))  # safetensors (Rust) puts the errno in its message
        code = e.errno if isinstance(e, OSError) else int(said.group(1)) if said else None
        if code in (errno.ENOSPC, errno.EDQUOT):
            reason = "no space left on the disk"
        elif code == errno.EFBIG:
            reason = "the file is larger than this system allows (a file-size limit: ulimit -f)"
        elif code is not None:
            reason = os.strerror(code).lower()
        elif isinstance(e, OSError) or "unexpected pos" in str(e):  # numpy's, torch.save's short writes
            reason = f"the write was cut short ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        else:
            raise
        where = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(where):
            where = os.path.dirname(where)
        free = shutil.disk_usage(where).free
        if reason.startswith("the write was cut short") and free < 1 << 20:
            reason = "no space left on the disk"
        raise WriteError(f"could not write {path}: {reason} ({human_bytes(free)} free there). {kept}") from None


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary file name beside path, for a writer that wants a name rather than bytes: the file is renamed
    to path when the with-block ends, and removed if it raises, so a reader never sees half a file.

        with atomic_path("model.gguf") as tmp:
            writer = SomeWriter(tmp)  # writes and closes tmp
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        kept = f"{os.path.basename(path)} is as it was" if os.path.exists(path) else "Nothing was written"
        with writing(path, f"{kept}: free some space and try again"):
            yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str, data: bytes) -> None:
    """Write data to path through a temporary file and a rename: a reader never sees half a file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def replace_directory(tmp: str, final: str) -> None:
    """Swap the complete directory tmp in at final by renames: a reader finds the old whole or the new whole
    (between the two renames, the old one waits beside it as .<name>.old). The directory gets the permissions
    mkdir would give it (tempfile.mkdtemp makes 0700)."""
    os.chmod(tmp, 0o777 & ~current_umask())
    head, name = os.path.split(os.path.abspath(final))
    old = os.path.join(head, f".{name}.old")
    if os.path.isdir(final):  # else an old left by a swap killed between its renames is the only copy: kept
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_writes(directory: str) -> None:
    """Delete the temporary files (<name>.XXXXXXXX.tmp) of atomic_write and atomic_path calls whose process
    was killed (SIGKILL, power loss) before its rename: they hold nothing the finished file does not."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if re.fullmatch(r".+\.[a-z0-9_]{8}\.tmp", name) and os.path.isfile(path):
            os.remove(path)
