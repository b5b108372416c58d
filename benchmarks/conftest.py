import sys
import os

# the benchmarks import the tests' helpers where they need them
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
