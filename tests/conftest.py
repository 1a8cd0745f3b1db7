import os
import sys

# Tests import shared helpers (random_trees.py) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
