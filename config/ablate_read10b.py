# Round 16: round 15's epochs again on another seed (1338: other initial weights, batches, evaluation batches, and
# epoch orders), on config/cpu_10min.py with the bundled corpus, at its 1,240 steps, two cells at a time.
#   python ablate.py config/ablate_read10b.py
name = "read10b"
base = ["config/cpu_10min.py", "--data_dir=data/bundled_plus_bpe4096", "--seed=1338"]
iters = 1240
jobs = 2
cells = [
    ("random_1338", {"sampling": "random"}),
    ("epochs_1338", {"sampling": "epochs"}),
]
