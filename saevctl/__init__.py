"""saevctl: sparse autoencoders that make vision transformers interpretable and testable.

The library is organised as pipeline stages (extract, train, mine, probe, report) over artifact folders.
"""

__version__ = "0.1.0"
