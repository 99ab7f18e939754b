# The shape of the 10-minute run: config/cpu_10min.py's recipe (weight decay 0.6) against a bigger vocabulary,
# a wider model and twice the batch, each given the same 10 minutes of wall-clock: with the corpus seen ~7
# times and weight decay holding back the memorising, does more capacity or more tokens a step now pay?
#   python ablate.py config/ablate_shape10.py      # about 42 minutes: run nothing else meanwhile
name = "shape10"
base = ["config/cpu_10min.py", "--block_size=128"]  # cpu_10min.py as it was then
budget = 10.0
cells = [
    ("base", {}),
    ("vocab_8192", {"vocab_size": 8192}),
    ("width_192", {"n_embd": 192, "n_head": 6}),
    ("batch_32", {"batch_size": 32}),
]
