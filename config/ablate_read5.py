# Round 16, for the quickstart: round 15's epochs on config/quickstart.py with the bundled corpus, at the 1,250 steps
# it runs in its 5 minutes, two cells at a time.
#   python ablate.py config/ablate_read5.py
name = "read5"
base = ["config/quickstart.py", "--data_dir=data/bundled_plus_bpe4096"]
iters = 1250
jobs = 2
cells = [
    ("random", {"sampling": "random"}),
    ("epochs", {"sampling": "epochs"}),
]
