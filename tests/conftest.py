"""Puts the repository root on sys.path, so tests import tokenizer, data, prepare as `make test` does."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
