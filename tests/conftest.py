import os
import sys

# Test helpers (modelkit, ...) are imported as top-level modules from this directory.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
