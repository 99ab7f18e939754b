# The context of the 10-minute run: config/cpu_10min.py's recipe (rotary positions, weight decay 0.6) with
# 256- and 512-token windows, each given the same 10 minutes of wall-clock. A bundled story is ~210 tokens of
# the 4,096 vocabulary, so a 128-token window holds part of one and its tokens are predicted from 64 earlier
# ones on average; at 256 most of a story fits. Does the longer context pay for the attention it costs?
# (Round 1's block_256 cell lost at 3 minutes, with learned positions.) The whole val split is read in
# windows of each model's own context, so each is scored with the context it was trained for.
#   python ablate.py config/ablate_context10.py      # about 35 minutes: run nothing else meanwhile
name = "context10"
base = ["config/cpu_10min.py"]
budget = 10.0
cells = [
    ("block_256", {"block_size": 256, "batch_size": 8}),  # the same 2,048 tokens a step
    ("block_256_batch_16", {"block_size": 256, "batch_size": 16}),  # twice the tokens a step, half the steps
    ("block_512", {"block_size": 512, "batch_size": 4}),
]
