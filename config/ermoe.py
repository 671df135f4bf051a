# The default ERMoE run: the eigenbasis router (router.py, docs/design.md §2) in place of the linear
# softmax router, no load-balancing loss and no z-loss (the paper's claim: balance comes from the
# geometry, not from an auxiliary loss). Everything else as in the default run.
out_dir = "out-ermoe"
router = "ermoe"
ermoe_basis = "independent"  # 'partitioned' = disjoint subspaces; 'penalty' = soft-orthogonality ablation
c_lb = 0.0
c_z = 0.0
