"""The commands that read checkpoints and runs and print tables: ``dsnet evaluate``, ``dsnet
profile``, ``dsnet compare``.

May import ``dsnet.prune`` and below, never ``dsnet.deploy``. Importing one module of this package
imports none of its siblings.
"""
