"""The two DS-Net stages and what they run on: the training loop (``engine``), IEB and SGS steps,
evaluation, the run builders and skeleton (``runs``), one driver per stage (``stage_one``,
``stage_two``), BN recalibration, checkpoints and the conversion of published weights.

May import ``dsnet.models`` and below. Importing one module of this package imports none of its
siblings.
"""
