# The default ERMoE run: the eigenbasis router (router.py, docs/design.md §2) in place of the linear
# softmax router, no load-balancing loss and no z-loss. Its own defaults (router.py) are what keeps it
# alive on text (course/demos.py ermoe-search): a basis of rank d/2 (the experts read half the token's
# coordinates; at d/E = 16 they read too little), and the loss-free select bias of Wang et al. 2024 (an
# expert that no token selects gets no gradient: without it 7 of the 32 experts die).
# Everything else as in the default run.
out_dir = "out-ermoe"
router = "ermoe"
ermoe_basis = "independent"  # 'partitioned' = disjoint subspaces (rank d/E); 'penalty' = soft-orthogonality ablation
c_lb = 0.0
c_z = 0.0
