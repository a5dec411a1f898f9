"""legacy/: the fork-lerobot ``.pt`` files (one dict per episode): format, export, import, inspection.

The only package that imports torch outside capture; it sits on top of the store (and never the reverse).
"""
