"""Kill at any moment, the fast version of tests/kill_harness.py: prepare.py, train.py and finetune.py are
SIGKILLed a few times each -- between the two renames of a checkpoint swap, between a checkpoint's weights and
its state, just after a token file is swapped in, half-way through an atomic write, and once after a random
delay -- and resumed. After every kill each best/ and last/ loads (or the token files do) and a checkpoint
once written is never lost; the finished run equals an uninterrupted one (every tensor, every byte) and leaves
no temporary behind.

    python -m pytest -q tests/test_kill.py
    python tests/kill_harness.py --script=all --kills=50      # the long version, by hand
"""
import random

import pytest

import kill_harness

PLANS = {
    "prepare": [("step", "after tempfile.mkstemp .prepare_state.json.", 2),  # an atomic write cut short
                ("step", "after os.replace train.bin.tmp", 1),               # half-way through the final swap
                "timer"],
    "train": [("step", "after os.rename last .last.old", 1),    # last/ is gone, .last.old not yet replaced
              ("step", "after shutil.rmtree .last.old", 1),     # the save after it: .last.old the only copy
              ("step", "before torch.save state.pt", 2),        # weights written, the state not yet
              "timer"],
    "finetune": [("step", "after os.rename best .best.old", 1),
                 ("step", "before torch.save state.pt", 1),
                 "timer"],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The inputs and the uninterrupted reference runs of the three scripts."""
    work = str(tmp_path_factory.mktemp("kill"))
    kill_harness.setup_references(work, kill_harness.SCRIPTS)
    return work


@pytest.mark.parametrize("script", kill_harness.SCRIPTS)
def test_killed_at_any_moment_resumes_to_the_same_result(work, script):
    tally = kill_harness.run_script(script, work, len(PLANS[script]), random.Random(0), plan=PLANS[script],
                                    say=lambda line: None)
    assert tally["failures"] == [], "\n".join(tally["failures"])
    assert tally["kills"] == len(PLANS[script]) and tally["during_write"] >= 2, kill_harness.summary(tally)
