import os
import sys

# Tests import the dense reference as a sibling module.
sys.path.insert(0, os.path.dirname(__file__))
