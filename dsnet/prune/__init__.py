""""Rethinking the Value of Network Pruning" (Liu et al., ICLR 2019) as baselines for DS-Net: the
pruning methods (``channels``, ``reconstruct``, ``sparse``, ``slimming``, ``sss``), architectures found by
pruning (``arch``, ``found``), training budgets and the baseline runs (``baselines``, ``static``).

May import ``dsnet.train`` and below. Importing one module of this package imports none of its
siblings.
"""
