"""A full disk: a checkpoint or token file that cannot be written is one clear error (files.WriteError, one
line naming the file, the reason and the space left), and what was on disk before stays whole and loadable;
with space again, the same command continues.

Two ways to run out of room: a file-size limit on the script (RLIMIT_FSIZE, `ulimit -f`: every write past it
fails, no privileges needed, runs everywhere), and, where the tests may mount one (root), a real tmpfs a few
hundred KB large that fills up.

    python -m pytest -q tests/test_full_disk.py
"""
import errno
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

import kill_harness
from files import WriteError, writing

LIMIT = 64 * 1024  # bytes a file may grow to: less than a checkpoint's weights or a token file, more than a log


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A prepared corpus and a finished 24-iteration run (tests/kill_harness.py's set-up)."""
    work = str(tmp_path_factory.mktemp("full_disk"))
    kill_harness.setup_references(work, ["finetune"])  # builds the prepare and train runs finetune needs
    return work


def run(name, work, out, *extra, file_limit=None):
    """prepare.py or train.py as tests/kill_harness.py runs them, into out, optionally under a file-size limit."""
    script, args, _ = kill_harness.command(name, work, out)
    args = [a for a in args if not a.startswith(tuple(e.split("=")[0] + "=" for e in extra))] + list(extra)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, script, *args], cwd=kill_harness.ROOT, capture_output=True, text=True,
                          preexec_fn=limit if file_limit else None)


def one_error_line(proc):
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not write "), proc.stderr
    return error


def assert_run_is_whole(out, reference):
    """best/ and last/ load and hold the reference's bytes; no temporary is left."""
    assert kill_harness.check_checkpoints(out) == []
    for kind in ("best", "last"):
        assert kill_harness.compare_files(os.path.join(out, kind), os.path.join(reference, kind)) == []
    assert kill_harness.temporaries(out) == []


def test_a_checkpoint_past_the_file_size_limit_keeps_the_previous_one(work, tmp_path):
    reference = os.path.join(work, "reference", "train")
    out = str(tmp_path / "run")
    shutil.copytree(reference, out)
    failed = run("train", work, out, "--init_from=resume", "--max_iters=32", file_limit=LIMIT)
    error = one_error_line(failed)
    assert f"{out}/" in error and "larger than this system allows" in error and "--init_from=resume" in error
    assert_run_is_whole(out, reference)
    done = run("train", work, out, "--init_from=resume", "--max_iters=32")  # room again: it continues
    assert done.returncode == 0, done.stderr[-3000:]
    assert torch.load(os.path.join(out, "last", "state.pt"), weights_only=True)["iter_num"] == 32


def test_token_files_past_the_file_size_limit_keep_the_previous_ones(work, tmp_path):
    reference = os.path.join(work, "reference", "prepare", "data")
    out = str(tmp_path)
    shutil.copytree(reference, os.path.join(out, "data"))
    failed = run("prepare", work, out, "--vocab_size=600", file_limit=LIMIT)  # another vocabulary, same place
    error = one_error_line(failed)
    assert "larger than this system allows" in error and "run the same command again" in error
    assert kill_harness.check_token_files(os.path.join(out, "data"), reference) == []  # the old ones, whole
    assert kill_harness.compare_files(os.path.join(out, "data"), reference, skip_temporaries=True) == []
    done = run("prepare", work, out, "--vocab_size=600")  # room again: it continues
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = str(tmp_path / "fresh")
    assert run("prepare", work, fresh, "--vocab_size=600").returncode == 0
    assert kill_harness.compare_files(os.path.join(out, "data"), os.path.join(fresh, "data")) == []


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1.5 MB mounted at tmp_path/disk (needs root), unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root; the file-size-limit tests cover the same writes")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield str(disk)
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(work, small_disk):
    reference = os.path.join(work, "reference", "train")
    out = os.path.join(small_disk, "run")
    shutil.copytree(reference, out)  # ~1.2 MB of the 1.5: no room for another checkpoint
    error = one_error_line(run("train", work, out, "--init_from=resume", "--max_iters=32"))
    assert "no space left on the disk" in error and "free there" in error
    assert_run_is_whole(out, reference)


def test_token_files_on_a_full_disk_keep_the_previous_ones(work, small_disk):
    reference = os.path.join(work, "reference", "prepare", "data")
    shutil.copytree(reference, os.path.join(small_disk, "data"))
    with open(os.path.join(small_disk, "filler"), "wb") as f:  # leave ~100 KB: less than a token file
        f.write(bytes(shutil.disk_usage(small_disk).free - 100_000))
    error = one_error_line(run("prepare", work, small_disk, "--vocab_size=600"))
    assert "no space left on the disk" in error
    assert kill_harness.check_token_files(os.path.join(small_disk, "data"), reference) == []
    assert kill_harness.compare_files(os.path.join(small_disk, "data"), reference, skip_temporaries=True) == []


@pytest.mark.parametrize("raised, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the disk"),
    (OSError(errno.EFBIG, "File too large"), "larger than this system allows"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "cut short"),
    (OSError("200000 requested and 46592 written"), "cut short"),  # numpy's tofile
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "no space"),
])
def test_writing_says_each_librarys_full_disk_one_way(tmp_path, raised, reason):
    with pytest.raises(WriteError) as caught:
        with writing(str(tmp_path / "last"), "The old one is kept."):
            raise raised
    message = str(caught.value)
    assert message.startswith(f"could not write {tmp_path / 'last'}: ") and reason in message
    assert message.endswith("free there). The old one is kept.") and "\n" not in message


def test_writing_lets_other_errors_through(tmp_path):
    for error in (RuntimeError("a bug in the model"), ValueError("bad config"), KeyboardInterrupt()):
        with pytest.raises(type(error)) as caught:
            with writing(str(tmp_path / "x"), ""):
                raise error
        assert caught.value is error
