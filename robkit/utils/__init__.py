"""The bottom layer: helpers every other robkit package may use, which import nothing of robkit's.

One copy of each concept lives here: files (atomic writes, sha256, code-free loading), suggestions for
misspelt names, normalisation constants and the distributed primitives the objectives need.
"""
