# Round 15: how the text is read and how the rate comes down, on config/cpu_10min.py with round 14's more text
# (the bundled corpus with its extra stories), at its 1,240 steps, two cells at a time; round 14's more_text
# cell is the reference.
#   python ablate.py config/ablate_read10.py
name = "read10"
base = ["config/cpu_10min.py", "--data_dir=data/bundled_plus_bpe4096"]
iters = 1240
jobs = 2
cells = [
    ("epochs", {"sampling": "epochs"}),
    ("wsd_sqrt", {"lr_schedule": "wsd_sqrt"}),
]
